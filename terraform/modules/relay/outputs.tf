output "relayd_toml" {
  description = "The relayd.toml the instances run, rendered from the feed list (docs/CONFIG.md)."
  value       = local.relayd_toml
}

output "user_data" {
  description = "The rendered user data script (plain text) of the launch template."
  value       = local.user_data
}

output "nlb_arn" {
  description = "ARN of the internal Network Load Balancer."
  value       = aws_lb.this.arn
}

output "nlb_dns_name" {
  description = "DNS name of the NLB: the capture side's targets are \"<this>:<feed port>\"."
  value       = aws_lb.this.dns_name
}

output "feeds" {
  description = "Per feed: listener port, listener ARN, target group ARN and health check path."
  value = { for name, feed in var.feeds : name => {
    port              = feed.port
    groups            = feed.groups
    listener_arn      = aws_lb_listener.feed[name].arn
    target_group_arn  = aws_lb_target_group.feed[name].arn
    health_check_path = "/healthz/${name}"
  } }
}

output "capture_targets" {
  description = "The capture side's targets per feed (\"host:port\")."
  value       = { for name, feed in var.feeds : name => ["${aws_lb.this.dns_name}:${feed.port}"] }
}

output "autoscaling_group_name" {
  description = "Name of the relay Auto Scaling group."
  value       = aws_autoscaling_group.this.name
}

output "launch_template_id" {
  description = "ID of the relay launch template."
  value       = aws_launch_template.this.id
}

output "instance_security_group_id" {
  description = "Security group of the relay instances."
  value       = aws_security_group.instance.id
}

output "nlb_security_group_id" {
  description = "Security group of the NLB."
  value       = aws_security_group.nlb.id
}

output "instance_role_arn" {
  description = "ARN of the instance role."
  value       = aws_iam_role.instance.arn
}

output "log_group_name" {
  description = "CloudWatch Logs group of the relay instances."
  value       = aws_cloudwatch_log_group.this.name
}

output "kms_key_arn" {
  description = "KMS key encrypting the log group and the alarm topic."
  value       = aws_kms_key.this.arn
}

output "alarm_topic_arn" {
  description = "SNS topic the alarms notify."
  value       = local.sns_topic_arn
}

output "auth_key_parameter_arns" {
  description = "The SSM parameters holding the feeds' HELLO keys, as the ARNs the instance role may read: create these SecureStrings before the instances boot."
  value       = local.auth_key_parameter_arns
}

output "auth_key_files" {
  description = "Per feed, the key files the user data writes and relayd.toml lists (auth_key_files); empty for a feed without authentication."
  value       = local.auth_key_files
}
