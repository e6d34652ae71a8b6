# Instance health for the Auto Scaling group: the host and the relayd process, never one feed.
# The group uses EC2 status checks (health_check_type = "EC2"); each instance adds its own check
# (files/relayd-host-check.sh, run by a systemd timer) and reports itself Unhealthy with
# autoscaling:SetInstanceHealth when relayd stops answering /healthz. A feed that is down shows
# in its target group (the NLB stops routing that feed to the instance) and in its alarms.

variable "host_health_check" {
  description = <<-EOT
    The instance's own check of relayd: every interval_seconds it asks /healthz on the health
    port; 200 and 503 (a feed down) both mean relayd runs. After `failures` checks in a row
    without an answer, the instance reports itself Unhealthy and the group replaces it.
    grace_period_seconds: the group's health check grace period and the time after boot before
    the first check.
  EOT
  type = object({
    interval_seconds     = optional(number, 30)
    failures             = optional(number, 4)
    grace_period_seconds = optional(number, 180)
  })
  default = {}

  validation {
    condition = (
      var.host_health_check.interval_seconds == floor(var.host_health_check.interval_seconds) && var.host_health_check.interval_seconds >= 10 &&
      var.host_health_check.failures == floor(var.host_health_check.failures) && var.host_health_check.failures >= 2 &&
      var.host_health_check.grace_period_seconds == floor(var.host_health_check.grace_period_seconds) && var.host_health_check.grace_period_seconds >= 60
    )
    error_message = "host_health_check: interval_seconds >= 10, failures >= 2 (one missed answer is no reason to replace a host), grace_period_seconds >= 60, all whole numbers."
  }
}

# The instances may mark only instances of their own group (tagged relayd:relay = name).
resource "aws_iam_role_policy" "host_health" {
  name_prefix = "relayd-host-health-"
  role        = aws_iam_role.instance.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid      = "ReportOwnHealth"
      Effect   = "Allow"
      Action   = ["autoscaling:SetInstanceHealth"]
      Resource = "arn:${local.partition}:autoscaling:${local.region}:${local.account_id}:autoScalingGroup:*:autoScalingGroupName/*"
      Condition = {
        StringEquals = { "autoscaling:ResourceTag/relayd:relay" = var.name }
      }
    }]
  })
}
