# A customer receiving the London feeds: run in the customer's account. The values under
# `relay` come from the relay owner's `terraform output customer` (environments/london).

terraform {
  required_version = ">= 1.9"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }
}

provider "aws" {
  region = "eu-west-2"
}

module "relayd_feeds" {
  source = "../.."

  name = "acme"
  relay = {
    ram_resource_share_arn = "arn:aws:ram:eu-west-2:111122223333:resource-share/01234567-89ab-cdef-0123-456789abcdef"
    transit_gateway_id     = "tgw-0123456789abcdef0"
    multicast_domain_id    = "tgw-mcast-domain-0123456789abcdef0"
    relay_source_cidrs     = ["10.60.1.0/24", "10.60.2.0/24"]
    feeds = {
      prod = { groups = ["239.192.20.0/24", "239.192.21.0/24"], ports = ["30000-30999"] }
    }
  }
  vpc = {
    id         = "vpc-0c0ffee0c0ffee000"
    subnet_ids = ["subnet-0c0ffee0c0ffee001", "subnet-0c0ffee0c0ffee002"]
  }
  # Step 1: false; apply, send module.relayd_feeds.attachment_id to the relay owner.
  # Step 2: once they have accepted it, true; apply again.
  attachment_accepted = false
}

output "attachment_id" {
  description = "Send this to the relay owner."
  value       = module.relayd_feeds.attachment_id
}

output "receivers_security_group_id" {
  description = "Attach to the receiving instances."
  value       = module.relayd_feeds.security_group_id
}

output "host_setup" {
  description = "sysctl settings (IGMPv2) and the groups to join on each receiving instance."
  value       = module.relayd_feeds.host_setup
}
