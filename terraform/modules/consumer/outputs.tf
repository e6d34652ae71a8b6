output "attachment_id" {
  description = "The VPC attachment to the shared Transit Gateway: send it to the relay owner, who accepts it (consumer_attachments)."
  value       = aws_ec2_transit_gateway_vpc_attachment.this.id
}

output "security_group_id" {
  description = "Attach it to the receiving instances (with any others they need)."
  value       = aws_security_group.receivers.id
}

output "associated_subnet_ids" {
  description = "Subnets associated with the multicast domain (empty until attachment_accepted)."
  value       = sort([for a in aws_ec2_transit_gateway_multicast_domain_association.this : a.subnet_id])
}

output "host_setup" {
  description = "What each receiving instance needs: IGMPv2 (the Transit Gateway speaks only v2), then join the groups."
  value = {
    sysctl = {
      "net.ipv4.conf.all.force_igmp_version"     = 2
      "net.ipv4.conf.default.force_igmp_version" = 2
    }
    groups = { for name, feed in var.relay.feeds : name => feed.groups }
    ports  = { for name, feed in var.relay.feeds : name => feed.ports }
  }
}
