# Offline tests of the multicast-domain module: mock_provider "aws" plans and applies without AWS.

mock_provider "aws" {
  source = "../../tests/mocks/aws"
}

override_resource {
  target = aws_ec2_transit_gateway_vpc_attachment.relay
  values = {
    id = "tgw-attach-00000000000000001"
  }
}

variables {
  name = "relayd-multicast"
  relay_vpc = {
    id         = "vpc-0123456789abcdef0"
    subnet_ids = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  }
  consumer_account_ids = ["210987654321", "345678901234", "456789012345"]
}

run "domain" {
  assert {
    condition     = aws_ec2_transit_gateway.this.multicast_support == "enable"
    error_message = "The Transit Gateway must support multicast."
  }

  assert {
    condition     = aws_ec2_transit_gateway_multicast_domain.this.igmpv2_support == "enable" && aws_ec2_transit_gateway_multicast_domain.this.static_sources_support == "disable"
    error_message = "The domain must have IGMPv2 on and static sources off."
  }

  assert {
    condition     = aws_ec2_transit_gateway_multicast_domain.this.transit_gateway_id == aws_ec2_transit_gateway.this.id && aws_ec2_transit_gateway_vpc_attachment.relay.transit_gateway_id == aws_ec2_transit_gateway.this.id
    error_message = "The domain and the relay attachment belong to the multicast Transit Gateway."
  }

  assert {
    condition     = aws_ec2_transit_gateway_vpc_attachment.relay.vpc_id == "vpc-0123456789abcdef0" && toset(aws_ec2_transit_gateway_vpc_attachment.relay.subnet_ids) == toset(["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"])
    error_message = "The relay VPC is attached through its subnets."
  }

  assert {
    condition = toset([for a in aws_ec2_transit_gateway_multicast_domain_association.relay : a.subnet_id]) == toset(["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]) && alltrue([for a in aws_ec2_transit_gateway_multicast_domain_association.relay :
      a.transit_gateway_attachment_id == "tgw-attach-00000000000000001" && a.transit_gateway_multicast_domain_id == aws_ec2_transit_gateway_multicast_domain.this.id
    ])
    error_message = "Every relay subnet is associated with the domain through the relay attachment."
  }

  assert {
    condition     = aws_ec2_transit_gateway.this.auto_accept_shared_attachments == "disable"
    error_message = "Shared attachments are not accepted automatically."
  }

  assert {
    condition     = aws_ec2_transit_gateway.this.default_route_table_association == "disable" && aws_ec2_transit_gateway.this.default_route_table_propagation == "disable"
    error_message = "No default route table: customers on the shared gateway get no unicast path to each other."
  }
}

run "share" {
  assert {
    condition     = toset([for p in aws_ram_principal_association.consumer : p.principal]) == toset(["210987654321", "345678901234", "456789012345"])
    error_message = "The RAM principals must equal the consumer list."
  }

  assert {
    condition     = alltrue([for p in aws_ram_principal_association.consumer : p.resource_share_arn == aws_ram_resource_share.this.arn])
    error_message = "Every principal belongs to the one share."
  }

  assert {
    condition     = aws_ram_resource_share.this.allow_external_principals
    error_message = "The share reaches customers' accounts outside the organisation by default."
  }

  assert {
    condition     = aws_ram_resource_association.transit_gateway.resource_arn == aws_ec2_transit_gateway.this.arn && aws_ram_resource_association.multicast_domain[0].resource_arn == aws_ec2_transit_gateway_multicast_domain.this.arn
    error_message = "The share carries the Transit Gateway and its multicast domain."
  }

  assert {
    condition     = output.customer.transit_gateway_id == aws_ec2_transit_gateway.this.id && output.customer.multicast_domain_id == aws_ec2_transit_gateway_multicast_domain.this.id && output.customer.ram_resource_share_arn == aws_ram_resource_share.this.arn
    error_message = "The customer output names the share, the Transit Gateway and the domain."
  }
}

# Same state as the runs above: dropping an account must remove exactly its association.
run "remove_account" {
  variables {
    consumer_account_ids = ["210987654321", "456789012345"]
  }

  assert {
    condition     = toset(keys(aws_ram_principal_association.consumer)) == toset(["210987654321", "456789012345"])
    error_message = "Removing 345678901234 from the list must remove its principal association and keep the others."
  }

  assert {
    condition     = contains(run.share.consumer_account_ids, "345678901234") && output.consumer_account_ids == tolist(["210987654321", "456789012345"])
    error_message = "The account was shared before and is gone now; the output lists the remaining consumers."
  }
}

run "organisation_only" {
  command = plan

  variables {
    allow_external_principals = false
    share_multicast_domain    = false
  }

  assert {
    condition     = !aws_ram_resource_share.this.allow_external_principals && length(aws_ram_resource_association.multicast_domain) == 0
    error_message = "allow_external_principals = false and share_multicast_domain reach the share."
  }
}

run "consumer_attachment" {
  variables {
    consumer_attachments = {
      acme = { account_id = "210987654321", attachment_id = "tgw-attach-0acce55acce55acce", subnet_ids = ["subnet-0ccccccccccccccc1", "subnet-0ccccccccccccccc2"] }
    }
  }

  assert {
    condition     = aws_ec2_transit_gateway_vpc_attachment_accepter.consumer["acme"].transit_gateway_attachment_id == "tgw-attach-0acce55acce55acce"
    error_message = "A listed consumer attachment is accepted."
  }

  assert {
    condition     = toset([for a in aws_ec2_transit_gateway_multicast_domain_association.consumer : "${a.transit_gateway_attachment_id}/${a.subnet_id}"]) == toset(["tgw-attach-0acce55acce55acce/subnet-0ccccccccccccccc1", "tgw-attach-0acce55acce55acce/subnet-0ccccccccccccccc2"])
    error_message = "The consumer's subnets are associated with the domain through its attachment."
  }
}
