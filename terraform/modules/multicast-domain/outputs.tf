output "transit_gateway_id" {
  description = "ID of the multicast Transit Gateway (consumers attach their VPCs to it)."
  value       = aws_ec2_transit_gateway.this.id
}

output "transit_gateway_arn" {
  description = "ARN of the multicast Transit Gateway."
  value       = aws_ec2_transit_gateway.this.arn
}

output "multicast_domain_id" {
  description = "ID of the IGMPv2 multicast domain (consumers associate their subnets with it)."
  value       = aws_ec2_transit_gateway_multicast_domain.this.id
}

output "multicast_domain_arn" {
  description = "ARN of the multicast domain."
  value       = aws_ec2_transit_gateway_multicast_domain.this.arn
}

output "relay_attachment_id" {
  description = "ID of the relay VPC's attachment."
  value       = aws_ec2_transit_gateway_vpc_attachment.relay.id
}

output "ram_resource_share_arn" {
  description = "ARN of the RAM share consumers accept (outside the organisation: from their RAM console)."
  value       = aws_ram_resource_share.this.arn
}

output "consumer_account_ids" {
  description = "The accounts the share is granted to."
  value       = sort(keys(aws_ram_principal_association.consumer))
}

output "customer" {
  description = "What a consumer account needs to receive the feeds."
  value = {
    ram_resource_share_arn = aws_ram_resource_share.this.arn
    transit_gateway_id     = aws_ec2_transit_gateway.this.id
    multicast_domain_id    = aws_ec2_transit_gateway_multicast_domain.this.id
    igmp_version           = 2
  }
}
