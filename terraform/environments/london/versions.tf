terraform {
  required_version = ">= 1.9"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }

  # Configure a remote backend (S3 with locking) before applying for real; see ../../README.md.
}

provider "aws" {
  region = "eu-west-2"
}
