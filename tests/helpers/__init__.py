"""Helpers shared by test modules (imported as ``helpers.<module>``)."""
