# The customer's side of relayd's multicast: accept the RAM share, attach the VPC to the shared
# multicast Transit Gateway, associate the receiving subnets with the multicast domain, and a
# security group for the receiving instances.
#
# The domain uses IGMPv2 without static sources, so any instance in an associated subnet may
# send to the feed groups, and every member receives it (docs/SECURITY.md, "customer
# injection"). This security group is the receiving side's defence: the feeds' UDP is admitted
# only from the relay subnets, so a datagram another customer injects into a feed group does not
# reach these instances.

locals {
  tags = merge(var.tags, { "relayd:consumer" = var.name })

  # UDP port ranges of every feed, once each.
  feed_port_ranges = { for p in distinct(flatten([for f in values(var.relay.feeds) : f.ports])) : p => {
    from = tonumber(split("-", p)[0])
    to   = tonumber(split("-", p)[length(split("-", p)) - 1])
  } }
  feed_sources = { for pair in setproduct(keys(local.feed_port_ranges), var.relay.relay_source_cidrs) :
    "${pair[0]}|${pair[1]}" => { ports = local.feed_port_ranges[pair[0]], cidr = pair[1] }
  }
}

resource "aws_ram_resource_share_accepter" "this" {
  count = var.accept_share ? 1 : 0

  share_arn = var.relay.ram_resource_share_arn
}

# The shared gateway has no default route table: this attachment gets no unicast route to the
# relay or to other customers.
resource "aws_ec2_transit_gateway_vpc_attachment" "this" {
  transit_gateway_id = var.relay.transit_gateway_id
  vpc_id             = var.vpc.id
  subnet_ids         = var.vpc.subnet_ids
  tags               = merge(local.tags, { Name = "${var.name}-relayd-multicast" })

  depends_on = [aws_ram_resource_share_accepter.this]
}

resource "aws_ec2_transit_gateway_multicast_domain_association" "this" {
  for_each = var.attachment_accepted ? toset(var.vpc.subnet_ids) : toset([])

  transit_gateway_multicast_domain_id = var.relay.multicast_domain_id
  transit_gateway_attachment_id       = aws_ec2_transit_gateway_vpc_attachment.this.id
  subnet_id                           = each.value
}

resource "aws_security_group" "receivers" {
  #checkov:skip=CKV2_AWS_5:the customer attaches it to their receiving instances (output security_group_id); the module creates no instances
  name_prefix = "${var.name}-relayd-receivers-"
  description = "relayd feed receivers: IGMP queries from the Transit Gateway, feed UDP from the relay subnets only"
  vpc_id      = var.vpc.id
  tags        = merge(local.tags, { Name = "${var.name}-relayd-receivers" })

  lifecycle {
    create_before_destroy = true
  }
}

# The Transit Gateway sends its IGMP general queries from 0.0.0.0.
resource "aws_vpc_security_group_ingress_rule" "igmp" {
  security_group_id = aws_security_group.receivers.id
  description       = "IGMP queries from the multicast Transit Gateway"
  ip_protocol       = "2"
  cidr_ipv4         = "0.0.0.0/32"
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "feed" {
  for_each = local.feed_sources

  security_group_id = aws_security_group.receivers.id
  description       = "relayd feed datagrams from the relay subnets only"
  ip_protocol       = "udp"
  from_port         = each.value.ports.from
  to_port           = each.value.ports.to
  cidr_ipv4         = each.value.cidr
  tags              = local.tags
}

# IGMPv2 membership reports and leaves go to the groups and 224.0.0.2.
resource "aws_vpc_security_group_egress_rule" "igmp" {
  security_group_id = aws_security_group.receivers.id
  description       = "IGMP membership reports to the multicast Transit Gateway"
  ip_protocol       = "2"
  cidr_ipv4         = "224.0.0.0/4"
  tags              = local.tags
}
