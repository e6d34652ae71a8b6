# Kept in a file of its own: Packer releases before 1.7 do not know `required_plugins`, and the
# offline check (.ci/lint-system.sh) validates the other files with such a Packer.
packer {
  required_version = ">= 1.9.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = "~> 1.3"
    }
  }
}
