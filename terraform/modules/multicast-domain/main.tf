locals {
  tags = merge(var.tags, { "relayd:multicast-domain" = var.name })

  consumer_subnet_associations = merge([for key, a in var.consumer_attachments : {
    for s in a.subnet_ids : "${key}|${s}" => { attachment_id = a.attachment_id, subnet_id = s }
  }]...)
}

################################################################################
# Multicast Transit Gateway and its IGMPv2 domain
################################################################################

# Consumer attachments are accepted by ID (consumer_attachments), never automatically.
# Multicast needs no route table: without a default one, attachments get no unicast routes,
# so customers sharing this gateway cannot reach each other or the relay VPC.
resource "aws_ec2_transit_gateway" "this" {
  description                     = var.transit_gateway.description
  amazon_side_asn                 = var.transit_gateway.amazon_side_asn
  multicast_support               = "enable"
  auto_accept_shared_attachments  = "disable"
  default_route_table_association = "disable"
  default_route_table_propagation = "disable"
  dns_support                     = "enable"
  vpn_ecmp_support                = "disable"
  tags                            = merge(local.tags, { Name = var.name })
}

resource "aws_ec2_transit_gateway_multicast_domain" "this" {
  transit_gateway_id              = aws_ec2_transit_gateway.this.id
  igmpv2_support                  = "enable"
  static_sources_support          = "disable"
  auto_accept_shared_associations = var.multicast_domain.auto_accept_shared_associations
  tags                            = merge(local.tags, { Name = var.name })
}

resource "aws_ec2_transit_gateway_vpc_attachment" "relay" {
  transit_gateway_id = aws_ec2_transit_gateway.this.id
  vpc_id             = var.relay_vpc.id
  subnet_ids         = var.relay_vpc.subnet_ids
  dns_support        = "enable"
  tags               = merge(local.tags, { Name = "${var.name}-relay" })
}

resource "aws_ec2_transit_gateway_multicast_domain_association" "relay" {
  for_each = toset(var.relay_vpc.subnet_ids)

  transit_gateway_multicast_domain_id = aws_ec2_transit_gateway_multicast_domain.this.id
  transit_gateway_attachment_id       = aws_ec2_transit_gateway_vpc_attachment.relay.id
  subnet_id                           = each.value
}

################################################################################
# RAM share: exactly the consumer accounts
################################################################################

resource "aws_ram_resource_share" "this" {
  name                      = var.name
  allow_external_principals = var.allow_external_principals
  tags                      = local.tags
}

resource "aws_ram_resource_association" "transit_gateway" {
  resource_share_arn = aws_ram_resource_share.this.arn
  resource_arn       = aws_ec2_transit_gateway.this.arn
}

resource "aws_ram_resource_association" "multicast_domain" {
  count = var.share_multicast_domain ? 1 : 0

  resource_share_arn = aws_ram_resource_share.this.arn
  resource_arn       = aws_ec2_transit_gateway_multicast_domain.this.arn
}

resource "aws_ram_principal_association" "consumer" {
  for_each = toset(var.consumer_account_ids)

  resource_share_arn = aws_ram_resource_share.this.arn
  principal          = each.value
}

################################################################################
# Consumer attachments, accepted here by name
################################################################################

resource "aws_ec2_transit_gateway_vpc_attachment_accepter" "consumer" {
  for_each = var.consumer_attachments

  transit_gateway_attachment_id = each.value.attachment_id
  tags                          = merge(local.tags, { Name = "${var.name}-${each.key}", "relayd:consumer-account" = each.value.account_id })
}

resource "aws_ec2_transit_gateway_multicast_domain_association" "consumer" {
  for_each = local.consumer_subnet_associations

  transit_gateway_multicast_domain_id = aws_ec2_transit_gateway_multicast_domain.this.id
  transit_gateway_attachment_id       = aws_ec2_transit_gateway_vpc_attachment_accepter.consumer[split("|", each.key)[0]].transit_gateway_attachment_id
  subnet_id                           = each.value.subnet_id
}
