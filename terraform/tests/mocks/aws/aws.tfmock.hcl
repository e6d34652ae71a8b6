# Shared mock data for `terraform test` with mock_provider "aws" (no AWS account needed).
# The provider validates ARNs it is given, so every ARN a resource computes is mocked with
# one of the right shape.

mock_data "aws_partition" {
  defaults = {
    partition  = "aws"
    dns_suffix = "amazonaws.com"
  }
}

mock_data "aws_caller_identity" {
  defaults = {
    account_id = "111122223333"
    arn        = "arn:aws:iam::111122223333:user/terraform-test"
  }
}

mock_data "aws_region" {
  defaults = {
    name = "eu-west-2"
  }
}

mock_resource "aws_kms_key" {
  defaults = {
    arn    = "arn:aws:kms:eu-west-2:111122223333:key/0d2d3f6a-1111-2222-3333-444455556666"
    key_id = "0d2d3f6a-1111-2222-3333-444455556666"
  }
}

mock_resource "aws_lb" {
  defaults = {
    arn        = "arn:aws:elasticloadbalancing:eu-west-2:111122223333:loadbalancer/net/relay-nlb/0123456789abcdef"
    arn_suffix = "net/relay-nlb/0123456789abcdef"
    dns_name   = "relay-nlb-0123456789abcdef.elb.eu-west-2.amazonaws.com"
  }
}

mock_resource "aws_lb_target_group" {
  defaults = {
    arn        = "arn:aws:elasticloadbalancing:eu-west-2:111122223333:targetgroup/relay-feed/0123456789abcdef"
    arn_suffix = "targetgroup/relay-feed/0123456789abcdef"
  }
}

mock_resource "aws_lb_listener" {
  defaults = {
    arn = "arn:aws:elasticloadbalancing:eu-west-2:111122223333:listener/net/relay-nlb/0123456789abcdef/0123456789abcdef"
  }
}

mock_resource "aws_iam_role" {
  defaults = {
    arn = "arn:aws:iam::111122223333:role/relay-instance"
  }
}

mock_resource "aws_iam_instance_profile" {
  defaults = {
    arn = "arn:aws:iam::111122223333:instance-profile/relay-instance"
  }
}

mock_resource "aws_launch_template" {
  defaults = {
    arn            = "arn:aws:ec2:eu-west-2:111122223333:launch-template/lt-0123456789abcdef0"
    id             = "lt-0123456789abcdef0"
    latest_version = 1
  }
}

mock_resource "aws_autoscaling_group" {
  defaults = {
    arn  = "arn:aws:autoscaling:eu-west-2:111122223333:autoScalingGroup:00000000-0000-0000-0000-000000000000:autoScalingGroupName/relay"
    name = "relay-relay-20260101000000000000000001"
  }
}

mock_resource "aws_sns_topic" {
  defaults = {
    arn = "arn:aws:sns:eu-west-2:111122223333:relay-alarms"
  }
}

mock_resource "aws_cloudwatch_log_group" {
  defaults = {
    arn = "arn:aws:logs:eu-west-2:111122223333:log-group:/relayd/relay"
  }
}

mock_resource "aws_ec2_transit_gateway" {
  defaults = {
    arn                                = "arn:aws:ec2:eu-west-2:111122223333:transit-gateway/tgw-0123456789abcdef0"
    id                                 = "tgw-0123456789abcdef0"
    association_default_route_table_id = "tgw-rtb-0123456789abcdef0"
    propagation_default_route_table_id = "tgw-rtb-0123456789abcdef0"
    owner_id                           = "111122223333"
  }
}

mock_resource "aws_ec2_transit_gateway_multicast_domain" {
  defaults = {
    arn = "arn:aws:ec2:eu-west-2:111122223333:transit-gateway-multicast-domain/tgw-mcast-domain-0123456789abcdef0"
    id  = "tgw-mcast-domain-0123456789abcdef0"
  }
}

mock_resource "aws_ec2_transit_gateway_vpc_attachment" {
  defaults = {
    id = "tgw-attach-0123456789abcdef0"
  }
}

mock_resource "aws_ec2_transit_gateway_peering_attachment" {
  defaults = {
    id = "tgw-attach-0fedcba9876543210"
  }
}

mock_resource "aws_ram_resource_share" {
  defaults = {
    arn = "arn:aws:ram:eu-west-2:111122223333:resource-share/01234567-89ab-cdef-0123-456789abcdef"
    id  = "arn:aws:ram:eu-west-2:111122223333:resource-share/01234567-89ab-cdef-0123-456789abcdef"
  }
}

mock_resource "aws_ram_resource_share_accepter" {
  defaults = {
    id = "arn:aws:ram:eu-west-2:111122223333:resource-share/01234567-89ab-cdef-0123-456789abcdef"
  }
}

mock_data "aws_subnet" {
  defaults = {
    cidr_block = "10.60.1.0/24"
  }
}
