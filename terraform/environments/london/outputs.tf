output "relayd_toml" {
  description = "The relayd.toml the London relays run."
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
    region = "eu-west-2"
    feeds  = { for name, feed in var.feeds : name => { groups = feed.groups, ports = feed.ports } }
    # Customers admit the feeds' UDP from these only (modules/consumer).
    relay_source_cidrs = sort(distinct([for s in data.aws_subnet.relay : s.cidr_block]))
  })
}
