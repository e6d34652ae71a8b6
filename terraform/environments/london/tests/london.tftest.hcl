# Offline tests of the London environment: both modules composed, mock_provider "aws".

mock_provider "aws" {
  source = "../../tests/mocks/aws"
}

override_resource {
  target = module.relay.aws_lb_target_group.feed["prod"]
  values = {
    arn        = "arn:aws:elasticloadbalancing:eu-west-2:111122223333:targetgroup/relayd-ldn-prod/00000000000000e2"
    arn_suffix = "targetgroup/relayd-ldn-prod/00000000000000e2"
  }
}

override_resource {
  target = module.relay.aws_lb_listener.feed["prod"]
  values = {
    arn = "arn:aws:elasticloadbalancing:eu-west-2:111122223333:listener/net/relayd-ldn-nlb/0123456789abcdef/00000000000000e2"
  }
}

variables {
  vpc = {
    id              = "vpc-0a1b2c3d4e5f60718"
    cidr_block      = "10.60.0.0/16"
    subnet_ids      = ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002"]
    route_table_ids = ["rtb-0a1b2c3d4e5f60001", "rtb-0a1b2c3d4e5f60002"]
  }
  data_centre = {
    cidrs                     = ["10.20.0.0/16", "172.16.40.0/24"]
    transit_gateway_id        = "tgw-0a1b2c3d4e5f60718"
    route_table_id            = "tgw-rtb-0000000000000d0c1"
    return_route_table_id     = "tgw-rtb-0000000000000d0c2"
    direct_connect_gateway_id = "5f5b3c1e-0000-4000-8000-00000000dc01"
  }
  remote_relay_cidrs = ["10.70.0.0/16"]
  feeds = {
    dev  = { port = 6666, groups = ["239.192.10.0/24"] }
    prod = { port = 6667, groups = ["239.192.20.0/24"] }
  }
  instance             = { ami_id = "ami-0a1b2c3d4e5f60718" }
  consumer_account_ids = ["210987654321", "345678901234"]
}

run "london" {
  assert {
    condition     = module.relay.feeds["prod"].port == 6667 && module.relay.feeds["prod"].target_group_arn == "arn:aws:elasticloadbalancing:eu-west-2:111122223333:targetgroup/relayd-ldn-prod/00000000000000e2" && module.relay.feeds["prod"].health_check_path == "/healthz/prod"
    error_message = "The prod feed's listener on 6667 belongs to its own target group, checked on /healthz/prod."
  }

  assert {
    condition     = output.capture_targets["prod"][0] == "${module.relay.nlb_dns_name}:6667" && output.capture_targets["dev"][0] == "${module.relay.nlb_dns_name}:6666" && length(output.capture_targets["prod"]) == 1
    error_message = "The capture side targets the NLB on each feed's port."
  }

  assert {
    condition     = toset([for r in aws_route.data_centre : "${r.route_table_id}>${r.destination_cidr_block}>${r.transit_gateway_id}"]) == toset([for p in setproduct(["rtb-0a1b2c3d4e5f60001", "rtb-0a1b2c3d4e5f60002"], ["10.20.0.0/16", "172.16.40.0/24"]) : "${p[0]}>${p[1]}>tgw-0a1b2c3d4e5f60718"])
    error_message = "Every relay route table sends every data-centre CIDR to the data-centre Transit Gateway."
  }

  assert {
    condition     = aws_ec2_transit_gateway_vpc_attachment.data_centre[0].transit_gateway_id == "tgw-0a1b2c3d4e5f60718" && aws_ec2_transit_gateway_vpc_attachment.data_centre[0].vpc_id == "vpc-0a1b2c3d4e5f60718"
    error_message = "The relay VPC is attached to the data-centre Transit Gateway."
  }

  assert {
    condition     = module.multicast_domain.consumer_account_ids == tolist(["210987654321", "345678901234"])
    error_message = "The RAM share reaches exactly the consumer accounts."
  }

  assert {
    condition     = output.customer.transit_gateway_id == module.multicast_domain.transit_gateway_id && output.customer.igmp_version == 2 && output.customer.feeds["prod"].groups == tolist(["239.192.20.0/24"])
    error_message = "The customer output carries the Transit Gateway, IGMPv2 and the feed groups."
  }

  assert {
    condition     = output.customer.relay_source_cidrs == tolist(["10.60.1.0/24"]) && output.customer.multicast_domain_id == module.multicast_domain.multicast_domain_id
    error_message = "The customer output carries the relay subnets' CIDRs, the only sources customers admit (the consumer module's relay input)."
  }

  assert {
    condition     = strcontains(output.relayd_toml, "name = \"prod\"\nlisten = \"0.0.0.0:6667\"\n") && strcontains(output.relayd_toml, "allowed_sources = [\"10.20.0.0/16\", \"172.16.40.0/24\"]\nallowed_groups = [\"239.192.20.0/24\"]\n")
    error_message = "relayd.toml comes from the same feed list and data-centre CIDRs."
  }
}

run "routing" {
  assert {
    condition     = aws_ec2_transit_gateway_vpc_attachment.data_centre[0].transit_gateway_default_route_table_association == false && aws_ec2_transit_gateway_vpc_attachment.data_centre[0].transit_gateway_default_route_table_propagation == false
    error_message = "The relay attachment never relies on the data-centre gateway's default association or propagation."
  }

  assert {
    condition     = aws_ec2_transit_gateway_route_table_association.relay[0].transit_gateway_attachment_id == aws_ec2_transit_gateway_vpc_attachment.data_centre[0].id && aws_ec2_transit_gateway_route_table_association.relay[0].transit_gateway_route_table_id == "tgw-rtb-0000000000000d0c1"
    error_message = "Relay VPC -> data centre: the relay attachment is associated with the route table holding the data-centre routes."
  }

  assert {
    condition     = aws_ec2_transit_gateway_route_table_propagation.relay[0].transit_gateway_attachment_id == aws_ec2_transit_gateway_vpc_attachment.data_centre[0].id && aws_ec2_transit_gateway_route_table_propagation.relay[0].transit_gateway_route_table_id == "tgw-rtb-0000000000000d0c2"
    error_message = "Data centre -> relay VPC (return route): the relay VPC CIDR is propagated into the Direct Connect attachment's route table."
  }

  assert {
    condition     = aws_dx_gateway_association.data_centre[0].dx_gateway_id == "5f5b3c1e-0000-4000-8000-00000000dc01" && aws_dx_gateway_association.data_centre[0].associated_gateway_id == "tgw-0a1b2c3d4e5f60718" && toset(aws_dx_gateway_association.data_centre[0].allowed_prefixes) == toset(["10.60.0.0/16", "10.70.0.0/16"])
    error_message = "The data centre learns the London and Tokyo relay CIDRs: they are the Direct Connect gateway association's allowed prefixes."
  }

  assert {
    condition     = output.data_centre_requirements.dx_allowed_prefixes == tolist(["10.60.0.0/16", "10.70.0.0/16"]) && length(output.data_centre_requirements.route_tables) == 2 && output.data_centre_requirements.feed_ports == { dev = 6666, prod = 6667 }
    error_message = "The data-centre team's requirements list the prefixes, both route tables and the feed ports."
  }
}

run "allowed_prefixes_cover_the_relays" {
  command = plan

  variables {
    data_centre = {
      cidrs              = ["10.20.0.0/16"]
      transit_gateway_id = "tgw-0a1b2c3d4e5f60718"
      route_table_id     = "tgw-rtb-0000000000000d0c1"
      allowed_prefixes   = ["10.60.0.0/15", "10.70.0.0/16"]
    }
  }

  assert {
    condition     = length(aws_dx_gateway_association.data_centre) == 0 && aws_ec2_transit_gateway_route_table_propagation.relay[0].transit_gateway_route_table_id == "tgw-rtb-0000000000000d0c1"
    error_message = "A network-team association is only checked; with one route table, association and propagation share it."
  }
}

run "allowed_prefixes_miss_tokyo" {
  command = plan

  variables {
    data_centre = {
      cidrs              = ["10.20.0.0/16"]
      transit_gateway_id = "tgw-0a1b2c3d4e5f60718"
      route_table_id     = "tgw-rtb-0000000000000d0c1"
      allowed_prefixes   = ["10.60.0.0/16", "10.71.0.0/16"]
    }
  }

  expect_failures = [var.data_centre]
}

run "allowed_prefixes_too_narrow" {
  command = plan

  variables {
    remote_relay_cidrs = []
    data_centre = {
      cidrs              = ["10.20.0.0/16"]
      transit_gateway_id = "tgw-0a1b2c3d4e5f60718"
      route_table_id     = "tgw-rtb-0000000000000d0c1"
      allowed_prefixes   = ["10.60.0.0/17"]
    }
  }

  expect_failures = [var.data_centre]
}

run "nobody_owns_the_prefixes" {
  command = plan

  variables {
    data_centre = {
      cidrs              = ["10.20.0.0/16"]
      transit_gateway_id = "tgw-0a1b2c3d4e5f60718"
      route_table_id     = "tgw-rtb-0000000000000d0c1"
    }
  }

  expect_failures = [var.data_centre]
}

run "quiet_feed" {
  command = plan

  variables {
    quiet_feeds = ["dev"]
  }

  assert {
    condition     = !contains(module.relay.feed_alarms["dev"], "relayd-ldn-relay-dev-silent") && contains(module.relay.feed_alarms["prod"], "relayd-ldn-relay-prod-silent") && contains(module.relay.feed_alarms["dev"], "relayd-ldn-relay-dev-lost-redundancy")
    error_message = "A quiet feed keeps every alarm but the silence one."
  }
}

run "existing_attachment" {
  command = plan

  variables {
    data_centre = {
      cidrs              = ["10.20.0.0/16"]
      transit_gateway_id = "tgw-0a1b2c3d4e5f60718"
      route_table_id     = "tgw-rtb-0000000000000d0c1"
      allowed_prefixes   = ["10.60.0.0/16", "10.70.0.0/16"]
      attach_relay_vpc   = false
    }
  }

  assert {
    condition     = length(aws_ec2_transit_gateway_vpc_attachment.data_centre) == 0 && length(aws_route.data_centre) == 2
    error_message = "With the VPC already attached only the routes are added."
  }

  assert {
    condition     = length(aws_ec2_transit_gateway_route_table_association.relay) == 0 && length(aws_ec2_transit_gateway_route_table_propagation.relay) == 0 && length(aws_dx_gateway_association.data_centre) == 0
    error_message = "Without the attachment here, its routing and the Direct Connect association are the owner's."
  }
}

run "authenticated_feeds" {
  command = plan

  variables {
    feeds = {
      dev  = { port = 6666, groups = ["239.192.10.0/24"] }
      prod = { port = 6667, groups = ["239.192.20.0/24"], auth_key_parameters = ["/relayd/prod/key-1", "/relayd/prod/key-2"] }
    }
    auth_key_kms_key_arns = ["arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"]
  }

  assert {
    condition     = output.auth_key_parameters == tolist(["arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-1", "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-2"])
    error_message = "London passes the key parameters through to the relay module."
  }

  assert {
    condition     = length(module.relay.auth_key_files["dev"]) == 0 && tolist(module.relay.auth_key_files["prod"]) == tolist(["/etc/relayd/keys/prod-1.key", "/etc/relayd/keys/prod-2.key"]) && strcontains(output.relayd_toml, "auth_key_files = [\"/etc/relayd/keys/prod-1.key\", \"/etc/relayd/keys/prod-2.key\"]\n")
    error_message = "Only prod lists key files in relayd.toml, both during the rotation."
  }
}

run "london_passes_ecs_mode_to_the_relay_module" {
  command = plan

  variables {
    mode = "ecs"
    ecs  = { image_tag = "1.0.0" }
  }

  assert {
    condition     = module.relay.mode == "ecs" && strcontains(module.relay.user_data, "ecs-mode: begin")
    error_message = "mode = \"ecs\" in the environment must reach the relay module (and its user data)"
  }
}

run "london_host_mode_by_default_creates_no_cluster" {
  command = plan

  assert {
    condition     = module.relay.mode == "host" && !strcontains(module.relay.user_data, "ecs-mode: begin")
    error_message = "the London environment must default to host mode (no ECS block in the user data)"
  }
}
