# Inputs the multicast-domain module must refuse.

mock_provider "aws" {
  source = "../../tests/mocks/aws"
}

variables {
  name = "relayd-multicast"
  relay_vpc = {
    id         = "vpc-0123456789abcdef0"
    subnet_ids = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  }
  consumer_account_ids = ["210987654321"]
}

run "malformed_account_id" {
  command = plan
  variables {
    consumer_account_ids = ["21098765432"]
  }
  expect_failures = [var.consumer_account_ids]
}

run "account_alias_not_id" {
  command = plan
  variables {
    consumer_account_ids = ["acme-prod"]
  }
  expect_failures = [var.consumer_account_ids]
}

run "repeated_account" {
  command = plan
  variables {
    consumer_account_ids = ["210987654321", "210987654321"]
  }
  expect_failures = [var.consumer_account_ids]
}

run "attachment_of_unlisted_account" {
  command = plan
  variables {
    consumer_attachments = {
      stranger = { account_id = "999999999999", attachment_id = "tgw-attach-0acce55acce55acce" }
    }
  }
  expect_failures = [var.consumer_attachments]
}

run "one_subnet" {
  command = plan
  variables {
    relay_vpc = {
      id         = "vpc-0123456789abcdef0"
      subnet_ids = ["subnet-0aaaaaaaaaaaaaaaa"]
    }
  }
  expect_failures = [var.relay_vpc]
}

run "public_asn" {
  command = plan
  variables {
    transit_gateway = { amazon_side_asn = 3356 }
  }
  expect_failures = [var.transit_gateway]
}
