# Offline tests of the Tokyo environment: relay, multicast domain and the peering to London.

mock_provider "aws" {
  source = "../../tests/mocks/aws"
}

mock_provider "aws" {
  alias  = "london"
  source = "../../tests/mocks/aws"
}

override_data {
  target = module.relay.data.aws_region.current
  values = {
    name = "ap-northeast-1"
  }
}

override_resource {
  target = aws_ec2_transit_gateway.transport
  values = {
    id                                 = "tgw-0000000000000070c"
    arn                                = "arn:aws:ec2:ap-northeast-1:111122223333:transit-gateway/tgw-0000000000000070c"
    association_default_route_table_id = "tgw-rtb-0000000000000070c"
  }
}

override_resource {
  target = aws_ec2_transit_gateway_route_table.transport
  values = {
    id = "tgw-rtb-0000000000000070c"
  }
}

override_resource {
  target = aws_ec2_transit_gateway_vpc_attachment.transport
  values = {
    id = "tgw-attach-0000000000000070c"
  }
}

override_resource {
  target = aws_ec2_transit_gateway_peering_attachment.london
  values = {
    id = "tgw-attach-000000000000ee5e1"
  }
}

variables {
  vpc = {
    id              = "vpc-0f1e2d3c4b5a69788"
    cidr_block      = "10.70.0.0/16"
    subnet_ids      = ["subnet-0f1e2d3c4b5a60001", "subnet-0f1e2d3c4b5a60002"]
    route_table_ids = ["rtb-0f1e2d3c4b5a60001", "rtb-0f1e2d3c4b5a60002"]
  }
  data_centre_cidrs = ["10.20.0.0/16", "172.16.40.0/24"]
  london = {
    transit_gateway_id    = "tgw-0a1b2c3d4e5f60718"
    route_table_id        = "tgw-rtb-0a1b2c3d4e5f60718"
    return_route_table_id = "tgw-rtb-0a1b2c3d4e5f60719"
  }
  feeds = {
    dev  = { port = 6666, groups = ["239.192.10.0/24"] }
    prod = { port = 6667, groups = ["239.192.20.0/24"] }
  }
  instance             = { ami_id = "ami-0f1e2d3c4b5a69788" }
  consumer_account_ids = ["210987654321"]
}

run "peering" {
  assert {
    condition     = aws_ec2_transit_gateway_peering_attachment.london.peer_region == "eu-west-2" && aws_ec2_transit_gateway_peering_attachment.london.peer_transit_gateway_id == "tgw-0a1b2c3d4e5f60718" && aws_ec2_transit_gateway_peering_attachment.london.transit_gateway_id == "tgw-0000000000000070c"
    error_message = "The Tokyo transport Transit Gateway peers with London's in eu-west-2."
  }

  assert {
    condition     = aws_ec2_transit_gateway_peering_attachment_accepter.london[0].transit_gateway_attachment_id == "tgw-attach-000000000000ee5e1"
    error_message = "London accepts exactly this peering attachment."
  }

  assert {
    condition = toset([for r in aws_ec2_transit_gateway_route.data_centre : r.destination_cidr_block]) == toset(["10.20.0.0/16", "172.16.40.0/24"]) && alltrue([for r in aws_ec2_transit_gateway_route.data_centre :
      r.transit_gateway_attachment_id == "tgw-attach-000000000000ee5e1" && r.transit_gateway_route_table_id == "tgw-rtb-0000000000000070c"
    ])
    error_message = "In Tokyo every data-centre CIDR routes to the peering attachment."
  }

  assert {
    condition     = aws_ec2_transit_gateway_route.london_to_tokyo[0].destination_cidr_block == "10.70.0.0/16" && aws_ec2_transit_gateway_route.london_to_tokyo[0].transit_gateway_route_table_id == "tgw-rtb-0a1b2c3d4e5f60719" && aws_ec2_transit_gateway_route.london_to_tokyo[0].transit_gateway_attachment_id == "tgw-attach-000000000000ee5e1"
    error_message = "In London the Tokyo VPC CIDR routes back over the peering, in the Direct Connect attachment's route table."
  }

  assert {
    condition     = aws_ec2_transit_gateway_route_table_association.london_peering[0].transit_gateway_attachment_id == "tgw-attach-000000000000ee5e1" && aws_ec2_transit_gateway_route_table_association.london_peering[0].transit_gateway_route_table_id == "tgw-rtb-0a1b2c3d4e5f60718"
    error_message = "London's side of the peering is associated with the route table holding the data-centre routes."
  }

  assert {
    condition     = aws_ec2_transit_gateway.transport.default_route_table_association == "disable" && aws_ec2_transit_gateway.transport.default_route_table_propagation == "disable"
    error_message = "Tokyo's routing is explicit: no default route table."
  }

  assert {
    condition     = aws_ec2_transit_gateway_route_table_association.vpc.transit_gateway_attachment_id == "tgw-attach-0000000000000070c" && aws_ec2_transit_gateway_route_table_association.vpc.transit_gateway_route_table_id == "tgw-rtb-0000000000000070c"
    error_message = "Tokyo VPC -> data centre: the VPC attachment is associated with the transport route table."
  }

  assert {
    condition     = aws_ec2_transit_gateway_route_table_propagation.vpc.transit_gateway_attachment_id == "tgw-attach-0000000000000070c" && aws_ec2_transit_gateway_route_table_propagation.vpc.transit_gateway_route_table_id == "tgw-rtb-0000000000000070c"
    error_message = "London -> Tokyo VPC: the VPC CIDR is propagated into the transport route table."
  }

  assert {
    condition     = aws_ec2_transit_gateway_route_table_association.peering.transit_gateway_attachment_id == "tgw-attach-000000000000ee5e1" && aws_ec2_transit_gateway_route_table_association.peering.transit_gateway_route_table_id == "tgw-rtb-0000000000000070c"
    error_message = "Tokyo's side of the peering is associated with the transport route table (where the VPC CIDR is)."
  }

  assert {
    condition     = output.london_requirements.static_route.destination == "10.70.0.0/16" && output.london_requirements.associate_with == "tgw-rtb-0a1b2c3d4e5f60718" && output.london_requirements.dx_allowed_prefix == "10.70.0.0/16"
    error_message = "London's owner gets exactly what to do on their side."
  }

  assert {
    condition     = toset([for r in aws_route.data_centre : "${r.route_table_id}>${r.destination_cidr_block}>${r.transit_gateway_id}"]) == toset([for p in setproduct(["rtb-0f1e2d3c4b5a60001", "rtb-0f1e2d3c4b5a60002"], ["10.20.0.0/16", "172.16.40.0/24"]) : "${p[0]}>${p[1]}>tgw-0000000000000070c"])
    error_message = "Every relay route table sends the data-centre CIDRs to the Tokyo transport Transit Gateway."
  }

  assert {
    condition     = aws_ec2_transit_gateway.transport.multicast_support != "enable" && module.multicast_domain.transit_gateway_id != aws_ec2_transit_gateway.transport.id
    error_message = "The TCP leg uses its own unicast Transit Gateway, not the multicast one shared with customers."
  }

  assert {
    condition     = aws_ec2_transit_gateway_vpc_attachment.transport.vpc_id == "vpc-0f1e2d3c4b5a69788" && aws_ec2_transit_gateway_vpc_attachment.transport.transit_gateway_id == "tgw-0000000000000070c"
    error_message = "The relay VPC is attached to the transport Transit Gateway."
  }

  assert {
    condition     = module.relay.feeds["prod"].port == 6667 && module.relay.feeds["prod"].health_check_path == "/healthz/prod" && output.customer.region == "ap-northeast-1"
    error_message = "Tokyo runs the same feeds."
  }

  assert {
    condition     = strcontains(output.relayd_toml, "allowed_sources = [\"10.20.0.0/16\", \"172.16.40.0/24\"]")
    error_message = "Tokyo's relays admit the data-centre CIDRs (the NLB preserves them across the peering)."
  }
}

run "peering_accepted_elsewhere" {
  command = plan

  variables {
    london = {
      transit_gateway_id = "tgw-0a1b2c3d4e5f60718"
      route_table_id     = "tgw-rtb-0a1b2c3d4e5f60718"
      account_id         = "999988887777"
      accept_peering     = false
    }
  }

  assert {
    condition     = length(aws_ec2_transit_gateway_peering_attachment_accepter.london) == 0 && length(aws_ec2_transit_gateway_route.london_to_tokyo) == 0 && length(aws_ec2_transit_gateway_route_table_association.london_peering) == 0 && aws_ec2_transit_gateway_peering_attachment.london.peer_account_id == "999988887777"
    error_message = "When London's owner accepts, nothing is created with the London provider."
  }
}

run "rejects_bad_london_ids" {
  command = plan

  variables {
    london = {
      transit_gateway_id = "tgw-0a1b2c3d4e5f60718"
      route_table_id     = "rtb-0a1b2c3d4e5f60718"
    }
  }

  expect_failures = [var.london]
}

run "authenticated_feeds" {
  command = plan

  variables {
    feeds = {
      dev = { port = 6666, groups = ["239.192.10.0/24"] }
      # The old key from Tokyo's own parameter, the new one read from London's by ARN.
      prod = { port = 6667, groups = ["239.192.20.0/24"], auth_key_parameters = ["/relayd/prod/key-1", "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-2"] }
    }
  }

  assert {
    condition     = output.auth_key_parameters == tolist(["arn:aws:ssm:ap-northeast-1:111122223333:parameter/relayd/prod/key-1", "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-2"])
    error_message = "A parameter name is Tokyo's own parameter; an ARN is read where it points."
  }

  assert {
    condition     = strcontains(module.relay.user_data, "fetch_key 'prod' '/etc/relayd/keys/prod-2.key' 'eu-west-2' 'arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-2'") && strcontains(module.relay.relayd_toml, "auth_key_files = [\"/etc/relayd/keys/prod-1.key\", \"/etc/relayd/keys/prod-2.key\"]\n")
    error_message = "Tokyo's user data fetches London's parameter from London, and relayd.toml lists both key files."
  }
}
