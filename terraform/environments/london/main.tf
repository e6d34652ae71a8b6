# London (eu-west-2): the data centre's TCP streams arrive over Direct Connect and the data-centre
# Transit Gateway; the relays re-emit them into the multicast Transit Gateway shared with customers.

locals {
  tags = merge(var.tags, { "relayd:environment" = "london" })

  dc_routes = { for pair in setproduct(var.vpc.route_table_ids, var.data_centre.cidrs) :
    "${pair[0]}|${pair[1]}" => { route_table_id = pair[0], cidr = pair[1] }
  }
}

module "relay" {
  source = "../../modules/relay"

  name                  = var.name
  vpc                   = { id = var.vpc.id, cidr_block = var.vpc.cidr_block, subnet_ids = var.vpc.subnet_ids }
  feeds                 = var.feeds
  auth_key_kms_key_arns = var.auth_key_kms_key_arns
  data_centre_cidrs     = var.data_centre.cidrs
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

# TCP leg: the relay VPC reaches the data centre through its Transit Gateway.
# Associated and propagated explicitly (routing.tf), never through the gateway's defaults.
resource "aws_ec2_transit_gateway_vpc_attachment" "data_centre" {
  count = var.data_centre.attach_relay_vpc ? 1 : 0

  transit_gateway_id                              = var.data_centre.transit_gateway_id
  vpc_id                                          = var.vpc.id
  subnet_ids                                      = var.vpc.subnet_ids
  transit_gateway_default_route_table_association = false
  transit_gateway_default_route_table_propagation = false
  tags                                            = merge(local.tags, { Name = "${var.name}-data-centre" })
}

resource "aws_route" "data_centre" {
  for_each = local.dc_routes

  route_table_id         = each.value.route_table_id
  destination_cidr_block = each.value.cidr
  transit_gateway_id     = var.data_centre.transit_gateway_id

  depends_on = [aws_ec2_transit_gateway_vpc_attachment.data_centre]
}

# The relay subnets' CIDRs: the only sources of the feeds' datagrams, for customers' security groups.
data "aws_subnet" "relay" {
  for_each = toset(var.vpc.subnet_ids)

  id = each.value
}
