output "relayd_toml" {
  description = "The relayd.toml the Tokyo relays run."
  value       = module.relay.relayd_toml
}

output "capture_targets" {
  description = "Targets for the data centre's [[capture]] feeds (\"host:port\")."
  value       = module.relay.capture_targets
}

output "relay" {
  description = "The relay's NLB, group, log group and alarm topic."
  value = {
    nlb_dns_name           = module.relay.nlb_dns_name
    autoscaling_group_name = module.relay.autoscaling_group_name
    log_group_name         = module.relay.log_group_name
    alarm_topic_arn        = module.relay.alarm_topic_arn
  }
}

output "auth_key_parameters" {
  description = "The SSM SecureString parameters (ARNs) the relays read their feeds' HELLO keys from; they must exist in this account before the instances boot."
  value       = module.relay.auth_key_parameter_arns
}

output "customer" {
  description = "What a consumer account needs (the consumer module's `relay` input): the RAM share, Transit Gateway and domain, the groups and ports per feed, and the relay subnets the datagrams come from."
  value = merge(module.multicast_domain.customer, {
    region = "ap-northeast-1"
    feeds  = { for name, feed in var.feeds : name => { groups = feed.groups, ports = feed.ports } }
    # Customers admit the feeds' UDP from these only (modules/consumer).
    relay_source_cidrs = sort(distinct([for s in data.aws_subnet.relay : s.cidr_block]))
  })
}

output "peering_attachment_id" {
  description = "The Tokyo-London Transit Gateway peering attachment (London accepts it unless accept_peering)."
  value       = aws_ec2_transit_gateway_peering_attachment.london.id
}

output "london_requirements" {
  description = "What London's data-centre Transit Gateway needs for Tokyo (done here unless london.accept_peering is false)."
  value = {
    accept_peering_attachment = aws_ec2_transit_gateway_peering_attachment.london.id
    associate_with            = var.london.route_table_id
    static_route              = { destination = var.vpc.cidr_block, route_table_id = coalesce(var.london.return_route_table_id, var.london.route_table_id), via = "the peering attachment" }
    dx_allowed_prefix         = var.vpc.cidr_block
  }
}
