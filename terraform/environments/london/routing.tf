# The TCP leg's routing on the data-centre Transit Gateway, explicitly:
#
#   data centre -> Direct Connect gateway -> [return_route_table_id] -> relay VPC CIDR
#        (propagated from the relay attachment), Tokyo's CIDR (static, from the Tokyo environment)
#   relay VPC -> relay attachment -> [route_table_id] -> data-centre CIDRs (propagated from the
#        Direct Connect gateway attachment)
#
# and the data centre learns the relay CIDRs only through the Direct Connect gateway
# association's allowed prefixes.

locals {
  return_route_table_id = coalesce(var.data_centre.return_route_table_id, var.data_centre.route_table_id)
  # What the data centre must learn over Direct Connect: this relay VPC and those behind peering.
  dx_allowed_prefixes = distinct(concat([var.vpc.cidr_block], var.remote_relay_cidrs))
}

resource "aws_ec2_transit_gateway_route_table_association" "relay" {
  count = var.data_centre.attach_relay_vpc ? 1 : 0

  transit_gateway_attachment_id  = aws_ec2_transit_gateway_vpc_attachment.data_centre[0].id
  transit_gateway_route_table_id = var.data_centre.route_table_id
}

resource "aws_ec2_transit_gateway_route_table_propagation" "relay" {
  count = var.data_centre.attach_relay_vpc ? 1 : 0

  transit_gateway_attachment_id  = aws_ec2_transit_gateway_vpc_attachment.data_centre[0].id
  transit_gateway_route_table_id = local.return_route_table_id
}

# The allowed prefixes are what the Direct Connect gateway advertises to the data centre for
# this Transit Gateway (required for a transit gateway association).
resource "aws_dx_gateway_association" "data_centre" {
  count = var.data_centre.direct_connect_gateway_id == null ? 0 : 1

  dx_gateway_id         = var.data_centre.direct_connect_gateway_id
  associated_gateway_id = var.data_centre.transit_gateway_id
  allowed_prefixes      = local.dx_allowed_prefixes
}

output "data_centre_requirements" {
  description = "What the data-centre and network teams must have in place for the TCP leg, as this environment sees it."
  value = {
    transit_gateway_id = var.data_centre.transit_gateway_id
    # On the Direct Connect gateway's association with that Transit Gateway.
    dx_allowed_prefixes = local.dx_allowed_prefixes
    dx_association      = var.data_centre.direct_connect_gateway_id == null ? "owned by the network team: its allowed prefixes must cover dx_allowed_prefixes" : "managed here"
    relay_attachment_id = var.data_centre.attach_relay_vpc ? aws_ec2_transit_gateway_vpc_attachment.data_centre[0].id : null
    # Route tables on the Transit Gateway and what each must hold.
    route_tables = {
      (var.data_centre.route_table_id) = "associated with the relay attachment (and Tokyo's peering); holds the data-centre CIDRs ${join(", ", var.data_centre.cidrs)} (propagated from the Direct Connect gateway attachment)"
      (local.return_route_table_id)    = "associated with the Direct Connect gateway attachment; holds ${var.vpc.cidr_block} (propagated from the relay attachment)${length(var.remote_relay_cidrs) > 0 ? " and ${join(", ", var.remote_relay_cidrs)} (static, to Tokyo's peering)" : ""}"
    }
    # The capture hosts' firewall: TCP to the NLB on these ports.
    feed_ports = { for name, feed in var.feeds : name => feed.port }
  }
}
