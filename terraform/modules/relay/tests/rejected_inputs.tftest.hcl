# Inputs the relay module must refuse before anything is planned.

mock_provider "aws" {
  source = "../../tests/mocks/aws"
}

variables {
  name = "relay"
  vpc = {
    id         = "vpc-0123456789abcdef0"
    cidr_block = "10.50.0.0/16"
    subnet_ids = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  }
  feeds = {
    dev  = { port = 6666, groups = ["239.10.1.0/24"] }
    prod = { port = 6667, groups = ["239.10.2.0/24"] }
  }
  data_centre_cidrs = ["10.20.0.0/16"]
  instance          = { ami_id = "ami-0123456789abcdef0" }
}

run "non_multicast_group" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["10.1.2.0/24"] } }
  }
  expect_failures = [var.feeds]
}

run "link_local_group" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["224.0.0.0/24"] } }
  }
  expect_failures = [var.feeds]
}

run "group_covering_link_local" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["224.0.0.0/8"] } }
  }
  expect_failures = [var.feeds]
}

run "group_with_host_bits" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.1/24"] } }
  }
  expect_failures = [var.feeds]
}

run "feed_port_clash" {
  command = plan
  variables {
    feeds = {
      dev  = { port = 6667, groups = ["239.10.1.0/24"] }
      prod = { port = 6667, groups = ["239.10.2.0/24"] }
    }
  }
  expect_failures = [var.feeds]
}

run "feed_port_is_health_port" {
  command = plan
  variables {
    feeds = { prod = { port = 8080, groups = ["239.10.2.0/24"] } }
  }
  expect_failures = [var.feeds]
}

run "feed_port_out_of_range" {
  command = plan
  variables {
    feeds = { prod = { port = 70000, groups = ["239.10.2.0/24"] } }
  }
  expect_failures = [var.feeds]
}

run "bad_feed_name" {
  command = plan
  variables {
    feeds = { "Prod!" = { port = 6667, groups = ["239.10.2.0/24"] } }
  }
  expect_failures = [var.feeds]
}

run "reversed_udp_port_range" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], ports = ["6000-5000"] } }
  }
  expect_failures = [var.feeds]
}

run "invalid_data_centre_cidr" {
  command = plan
  variables {
    data_centre_cidrs = ["10.20.0.0/33"]
  }
  expect_failures = [var.data_centre_cidrs]
}

run "data_centre_cidr_with_host_bits" {
  command = plan
  variables {
    data_centre_cidrs = ["10.20.0.1/16"]
  }
  expect_failures = [var.data_centre_cidrs]
}

run "data_centre_not_a_cidr" {
  command = plan
  variables {
    data_centre_cidrs = ["datacentre"]
  }
  expect_failures = [var.data_centre_cidrs]
}

run "data_centre_is_everywhere" {
  command = plan
  variables {
    data_centre_cidrs = ["10.20.0.0/16", "0.0.0.0/0"]
  }
  expect_failures = [var.data_centre_cidrs]
}

run "single_subnet" {
  command = plan
  variables {
    vpc = {
      id         = "vpc-0123456789abcdef0"
      cidr_block = "10.50.0.0/16"
      subnet_ids = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0aaaaaaaaaaaaaaaa"]
    }
  }
  expect_failures = [var.vpc]
}

run "bad_ami" {
  command = plan
  variables {
    instance = { ami_id = "relayd-latest" }
  }
  expect_failures = [var.instance]
}

run "auth_key_parameter_with_space" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["/relayd/prod key"] } }
  }
  expect_failures = [var.feeds]
}

run "auth_key_parameter_wildcard" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["/relayd/prod/*"] } }
  }
  expect_failures = [var.feeds]
}

run "auth_key_parameter_hierarchy_without_leading_slash" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["relayd/prod/key-1"] } }
  }
  expect_failures = [var.feeds]
}

run "auth_key_parameter_empty_level" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["/relayd//key-1"] } }
  }
  expect_failures = [var.feeds]
}

run "auth_key_parameter_reserved_prefix" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["/AWS/relayd/key-1"] } }
  }
  expect_failures = [var.feeds]
}

run "auth_key_parameter_not_ssm_arn" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["arn:aws:secretsmanager:eu-west-2:111122223333:secret:relayd-prod"] } }
  }
  expect_failures = [var.feeds]
}

run "auth_key_parameter_arn_wildcard_account" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["arn:aws:ssm:eu-west-2:*:parameter/relayd/prod/key-1"] } }
  }
  expect_failures = [var.feeds]
}

run "auth_key_parameter_twice" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["/relayd/prod/key-1", "/relayd/prod/key-1"] } }
  }
  expect_failures = [var.feeds]
}

run "auth_key_kms_alias" {
  command = plan
  variables {
    auth_key_kms_key_arns = ["arn:aws:kms:eu-west-2:111122223333:alias/relayd-keys"]
  }
  expect_failures = [var.auth_key_kms_key_arns]
}

run "watch_group_without_port" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], watch_groups = ["239.10.2.1"] } }
  }
  expect_failures = [var.feeds]
}

run "watch_group_not_multicast" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], watch_groups = ["10.0.0.1:5000"] } }
  }
  expect_failures = [var.feeds]
}

run "unknown_arbitration" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], arbitration = "sequence" } }
  }
  expect_failures = [var.feeds]
}

run "emitter_grace_not_a_duration" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], emitter_grace = "soon" } }
  }
  expect_failures = [var.feeds]
}

run "watch_group_on_the_beacon_port" {
  command = plan
  variables {
    feeds = { prod = { port = 6667, groups = ["239.10.2.0/24"], watch_groups = ["239.10.2.1:6667"] } }
  }
  expect_failures = [var.feeds]
}
