# Offline tests of the consumer module: mock_provider "aws" plans and applies without AWS.

mock_provider "aws" {
  source = "../../tests/mocks/aws"
}

override_resource {
  target = aws_ec2_transit_gateway_vpc_attachment.this
  values = {
    id = "tgw-attach-0c0ffee0c0ffee000"
  }
}

variables {
  name = "acme"
  relay = {
    ram_resource_share_arn = "arn:aws:ram:eu-west-2:111122223333:resource-share/01234567-89ab-cdef-0123-456789abcdef"
    transit_gateway_id     = "tgw-0123456789abcdef0"
    multicast_domain_id    = "tgw-mcast-domain-0123456789abcdef0"
    relay_source_cidrs     = ["10.60.1.0/24", "10.60.2.0/24"]
    feeds = {
      dev  = { groups = ["239.192.10.0/24"], ports = ["1-65535"] }
      prod = { groups = ["239.192.20.0/24"], ports = ["30000-30999", "31000"] }
    }
  }
  vpc = {
    id         = "vpc-0c0ffee0c0ffee000"
    subnet_ids = ["subnet-0c0ffee0c0ffee001", "subnet-0c0ffee0c0ffee002"]
  }
}

run "before_acceptance" {
  assert {
    condition     = aws_ram_resource_share_accepter.this[0].share_arn == var.relay.ram_resource_share_arn
    error_message = "The customer accepts the relay owner's RAM share."
  }

  assert {
    condition     = aws_ec2_transit_gateway_vpc_attachment.this.transit_gateway_id == "tgw-0123456789abcdef0" && aws_ec2_transit_gateway_vpc_attachment.this.vpc_id == "vpc-0c0ffee0c0ffee000" && toset(aws_ec2_transit_gateway_vpc_attachment.this.subnet_ids) == toset(var.vpc.subnet_ids)
    error_message = "The customer VPC is attached to the shared multicast Transit Gateway through its receiving subnets."
  }

  assert {
    condition     = length(aws_ec2_transit_gateway_multicast_domain_association.this) == 0 && output.attachment_id == "tgw-attach-0c0ffee0c0ffee000"
    error_message = "Until the relay owner accepts the attachment nothing is associated; the attachment ID is output to send to them."
  }

  assert {
    condition     = aws_vpc_security_group_ingress_rule.igmp.ip_protocol == "2" && aws_vpc_security_group_ingress_rule.igmp.cidr_ipv4 == "0.0.0.0/32" && aws_vpc_security_group_egress_rule.igmp.ip_protocol == "2"
    error_message = "The receivers take IGMP queries from 0.0.0.0/32 and may send membership reports."
  }

  assert {
    condition = toset([for r in aws_vpc_security_group_ingress_rule.feed : "${r.ip_protocol} ${r.from_port}-${r.to_port} < ${r.cidr_ipv4}"]) == toset([
      "udp 1-65535 < 10.60.1.0/24", "udp 1-65535 < 10.60.2.0/24",
      "udp 30000-30999 < 10.60.1.0/24", "udp 30000-30999 < 10.60.2.0/24",
      "udp 31000-31000 < 10.60.1.0/24", "udp 31000-31000 < 10.60.2.0/24",
    ])
    error_message = "The feeds' UDP is admitted only from the relay subnets, on the feeds' ports: another customer's injected datagrams are refused."
  }

  assert {
    condition     = output.host_setup.sysctl["net.ipv4.conf.all.force_igmp_version"] == 2 && output.host_setup.groups["prod"] == tolist(["239.192.20.0/24"])
    error_message = "The host setup names IGMPv2 and the groups to join."
  }
}

run "after_acceptance" {
  variables {
    attachment_accepted = true
  }

  assert {
    condition = toset([for a in aws_ec2_transit_gateway_multicast_domain_association.this : "${a.transit_gateway_multicast_domain_id}/${a.transit_gateway_attachment_id}/${a.subnet_id}"]) == toset([
      "tgw-mcast-domain-0123456789abcdef0/tgw-attach-0c0ffee0c0ffee000/subnet-0c0ffee0c0ffee001",
      "tgw-mcast-domain-0123456789abcdef0/tgw-attach-0c0ffee0c0ffee000/subnet-0c0ffee0c0ffee002",
    ])
    error_message = "Once accepted, each receiving subnet is associated with the multicast domain through the attachment."
  }
}

run "inside_the_organisation" {
  command = plan

  variables {
    accept_share = false
  }

  assert {
    condition     = length(aws_ram_resource_share_accepter.this) == 0
    error_message = "No invitation to accept inside the organisation."
  }
}

run "relay_sources_must_be_named" {
  command = plan

  variables {
    relay = {
      ram_resource_share_arn = "arn:aws:ram:eu-west-2:111122223333:resource-share/01234567-89ab-cdef-0123-456789abcdef"
      transit_gateway_id     = "tgw-0123456789abcdef0"
      multicast_domain_id    = "tgw-mcast-domain-0123456789abcdef0"
      relay_source_cidrs     = ["0.0.0.0/0"]
      feeds                  = { prod = { groups = ["239.192.20.0/24"], ports = ["30000-30999"] } }
    }
  }

  expect_failures = [var.relay]
}
