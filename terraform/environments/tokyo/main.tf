# Tokyo (ap-northeast-1): multicast does not cross Transit Gateway peering, so the TCP streams
# come from London over inter-region peering and a Tokyo relay re-emits them locally.

locals {
  tags = merge(var.tags, { "relayd:environment" = "tokyo" })

  dc_routes = { for pair in setproduct(var.vpc.route_table_ids, var.data_centre_cidrs) :
    "${pair[0]}|${pair[1]}" => { route_table_id = pair[0], cidr = pair[1] }
  }
}

module "relay" {
  source = "../../modules/relay"

  name                  = var.name
  vpc                   = { id = var.vpc.id, cidr_block = var.vpc.cidr_block, subnet_ids = var.vpc.subnet_ids }
  feeds                 = var.feeds
  auth_key_kms_key_arns = var.auth_key_kms_key_arns
  data_centre_cidrs     = var.data_centre_cidrs
  instance              = var.instance
  ecs_cluster_name      = var.ecs_cluster_name
  mode                  = var.mode
  ecs                   = var.ecs
  alarms                = { email_endpoints = var.alarm_emails, quiet_feeds = var.quiet_feeds }
  tags                  = local.tags
}

module "multicast_domain" {
  source = "../../modules/multicast-domain"

  name                      = "${var.name}-multicast"
  relay_vpc                 = { id = var.vpc.id, subnet_ids = var.vpc.subnet_ids }
  consumer_account_ids      = var.consumer_account_ids
  allow_external_principals = var.allow_external_principals
  consumer_attachments      = var.consumer_attachments
  tags                      = local.tags
}

################################################################################
# TCP leg: Tokyo transport Transit Gateway peered with London's
################################################################################

# Routing is explicit: one route table, no default association or propagation.
#
#   Tokyo relay VPC -> VPC attachment -> [transport] -> data-centre CIDRs, static, to the peering
#   London (peering) -> peering attachment -> [transport] -> Tokyo VPC CIDR (propagated)
#   On London's data-centre gateway (aws.london): London's side of the peering is associated
#   with london.route_table_id (the data-centre routes), and the Tokyo VPC CIDR routes back over
#   the peering in london.return_route_table_id (the Direct Connect attachment's table).
resource "aws_ec2_transit_gateway" "transport" {
  description                     = "relayd TCP from the data centre via London"
  amazon_side_asn                 = var.transport_asn
  auto_accept_shared_attachments  = "disable"
  default_route_table_association = "disable"
  default_route_table_propagation = "disable"
  tags                            = merge(local.tags, { Name = "${var.name}-transport" })
}

resource "aws_ec2_transit_gateway_route_table" "transport" {
  transit_gateway_id = aws_ec2_transit_gateway.transport.id
  tags               = merge(local.tags, { Name = "${var.name}-transport" })
}

resource "aws_ec2_transit_gateway_vpc_attachment" "transport" {
  transit_gateway_id                              = aws_ec2_transit_gateway.transport.id
  vpc_id                                          = var.vpc.id
  subnet_ids                                      = var.vpc.subnet_ids
  transit_gateway_default_route_table_association = false
  transit_gateway_default_route_table_propagation = false
  tags                                            = merge(local.tags, { Name = "${var.name}-transport" })
}

resource "aws_ec2_transit_gateway_route_table_association" "vpc" {
  transit_gateway_attachment_id  = aws_ec2_transit_gateway_vpc_attachment.transport.id
  transit_gateway_route_table_id = aws_ec2_transit_gateway_route_table.transport.id
}

resource "aws_ec2_transit_gateway_route_table_propagation" "vpc" {
  transit_gateway_attachment_id  = aws_ec2_transit_gateway_vpc_attachment.transport.id
  transit_gateway_route_table_id = aws_ec2_transit_gateway_route_table.transport.id
}

resource "aws_ec2_transit_gateway_peering_attachment" "london" {
  transit_gateway_id      = aws_ec2_transit_gateway.transport.id
  peer_transit_gateway_id = var.london.transit_gateway_id
  peer_region             = "eu-west-2"
  peer_account_id         = var.london.account_id
  tags                    = merge(local.tags, { Name = "${var.name}-to-london" })
}

resource "aws_ec2_transit_gateway_peering_attachment_accepter" "london" {
  count    = var.london.accept_peering ? 1 : 0
  provider = aws.london

  transit_gateway_attachment_id = aws_ec2_transit_gateway_peering_attachment.london.id
  tags                          = merge(local.tags, { Name = "${var.name}-from-tokyo" })
}

# Tokyo's side of the peering: traffic from London looks up the Tokyo VPC CIDR here. A peering
# attachment can be associated only once it is accepted.
resource "aws_ec2_transit_gateway_route_table_association" "peering" {
  transit_gateway_attachment_id  = aws_ec2_transit_gateway_peering_attachment.london.id
  transit_gateway_route_table_id = aws_ec2_transit_gateway_route_table.transport.id

  depends_on = [aws_ec2_transit_gateway_peering_attachment_accepter.london]
}

# Peering attachments take no propagation: static routes on both sides.
resource "aws_ec2_transit_gateway_route" "data_centre" {
  for_each = toset(var.data_centre_cidrs)

  destination_cidr_block         = each.value
  transit_gateway_route_table_id = aws_ec2_transit_gateway_route_table.transport.id
  transit_gateway_attachment_id  = aws_ec2_transit_gateway_peering_attachment.london.id

  depends_on = [aws_ec2_transit_gateway_peering_attachment_accepter.london]
}

# London's side of the peering: associated with the route table that holds the data-centre
# routes, so Tokyo's traffic finds the Direct Connect gateway.
resource "aws_ec2_transit_gateway_route_table_association" "london_peering" {
  count    = var.london.accept_peering ? 1 : 0
  provider = aws.london

  transit_gateway_attachment_id  = aws_ec2_transit_gateway_peering_attachment_accepter.london[0].transit_gateway_attachment_id
  transit_gateway_route_table_id = var.london.route_table_id
}

# The return path: the data centre's traffic to Tokyo, in the table the Direct Connect
# gateway attachment is associated with.
resource "aws_ec2_transit_gateway_route" "london_to_tokyo" {
  count    = var.london.accept_peering ? 1 : 0
  provider = aws.london

  destination_cidr_block         = var.vpc.cidr_block
  transit_gateway_route_table_id = coalesce(var.london.return_route_table_id, var.london.route_table_id)
  transit_gateway_attachment_id  = aws_ec2_transit_gateway_peering_attachment_accepter.london[0].transit_gateway_attachment_id
}

resource "aws_route" "data_centre" {
  for_each = local.dc_routes

  route_table_id         = each.value.route_table_id
  destination_cidr_block = each.value.cidr
  transit_gateway_id     = aws_ec2_transit_gateway.transport.id

  depends_on = [aws_ec2_transit_gateway_vpc_attachment.transport]
}

# The relay subnets' CIDRs: the only sources of the feeds' datagrams, for customers' security groups.
data "aws_subnet" "relay" {
  for_each = toset(var.vpc.subnet_ids)

  id = each.value
}
