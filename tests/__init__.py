"""relayd's tests (a package, so that bench/ can import the shared helpers in tests.helpers)."""
