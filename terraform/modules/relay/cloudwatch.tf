# relayd's own figures in CloudWatch, the per-feed alarms on them, and a dashboard.
#
# The CloudWatch agent on each instance scrapes relayd's /metrics (Prometheus text) every
# 30 s and writes the metrics listed in relayd-metrics.json to CloudWatch as embedded metric
# format, namespace "relayd", dimensions relay (this module's name) and feed. Counters arrive
# as the increase since the previous scrape, so the Sum over a minute, across all instances
# (they publish under the same dimensions), is the feed's datagrams in that minute for the
# whole relay.

locals {
  metrics_file      = jsondecode(file("${path.module}/relayd-metrics.json"))
  relayd_metrics    = { for m in local.metrics_file.metrics : m.key => m.name }
  metrics_namespace = local.metrics_file.namespace

  # As the user data writes them (the tests read these).
  agent_config_rendered    = jsonencode(local.cloudwatch_agent_config)
  prometheus_yaml_rendered = yamlencode(local.prometheus_config)

  prometheus_config = {
    global = { scrape_interval = "30s", scrape_timeout = "10s" }
    scrape_configs = [{
      job_name     = "relayd"
      metrics_path = "/metrics"
      sample_limit = 10000
      static_configs = [{
        targets = ["127.0.0.1:${var.health_port}"]
        labels  = { relay = var.name }
      }]
    }]
  }

  cloudwatch_agent_config = {
    agent = { logfile = "/opt/aws/amazon-cloudwatch-agent/logs/amazon-cloudwatch-agent.log" }
    logs = {
      force_flush_interval = 5
      logs_collected = {
        files = {
          collect_list = [{
            file_path         = "/var/log/relayd/relayd.log"
            log_group_name    = local.log_group_name
            log_stream_name   = "{instance_id}"
            retention_in_days = -1
            timezone          = "UTC"
          }]
        }
      }
      metrics_collected = {
        prometheus = {
          cluster_name           = var.name
          log_group_name         = local.metrics_log_group_name
          prometheus_config_path = "/etc/amazon-cloudwatch-agent/relayd-prometheus.yaml"
          emf_processor = {
            metric_declaration_dedup = true
            metric_namespace         = local.metrics_namespace
            metric_unit              = { for m in local.metrics_file.metrics : m.name => m.unit }
            metric_declaration = [{
              source_labels    = ["job"]
              label_matcher    = "^relayd$"
              dimensions       = [local.metrics_file.dimensions]
              metric_selectors = [for name in sort(values(local.relayd_metrics)) : "^${name}$"]
            }]
          }
        }
      }
    }
  }

  silent_alarm_feeds = toset([for name in keys(var.feeds) : name if !contains(var.alarms.quiet_feeds, name)])

  feed_dimensions = { for name in keys(var.feeds) : name => { relay = var.name, feed = name } }
}

# The agent writes the EMF events here (CloudWatch extracts the metrics from them).
resource "aws_cloudwatch_log_group" "metrics" {
  #checkov:skip=CKV_AWS_338:EMF events only carry the metrics CloudWatch has already extracted (kept 15 months as metrics); a week of raw events is enough to debug the agent
  name              = local.metrics_log_group_name
  retention_in_days = 7
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

################################################################################
# Per-feed alarms on relayd's figures
################################################################################

# The feed's datagrams out, summed over every instance: zero for silent_minutes means no
# customer got anything, whichever instance should have sent it (a standby sends nothing, so
# a per-instance minimum could not tell). No data at all (no agent, no relayd) is as bad.
resource "aws_cloudwatch_metric_alarm" "feed_silent" {
  for_each = local.silent_alarm_feeds

  alarm_name          = "${var.name}-relay-${each.key}-silent"
  alarm_description   = "Feed ${each.key} of relay ${var.name}: no datagram emitted by any instance for ${var.alarms.silent_minutes} minutes (${local.relayd_metrics.datagrams_out}, sum over the group)."
  namespace           = local.metrics_namespace
  metric_name         = local.relayd_metrics.datagrams_out
  dimensions          = local.feed_dimensions[each.key]
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = var.alarms.silent_minutes
  datapoints_to_alarm = var.alarms.silent_minutes
  comparison_operator = "LessThanThreshold"
  threshold           = 1
  treat_missing_data  = "breaching"
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = merge(local.tags, { "relayd:feed" = each.key })
}

# Sequence gaps seen by the relay (jumps in a capture session's numbering: data lost between
# the capture side and this relay, e.g. beyond the replay buffer).
resource "aws_cloudwatch_metric_alarm" "relay_gaps" {
  for_each = var.feeds

  alarm_name          = "${var.name}-relay-${each.key}-gaps"
  alarm_description   = "Feed ${each.key} of relay ${var.name}: datagrams missing between the capture side and the relay (${local.relayd_metrics.gaps} rose)."
  namespace           = local.metrics_namespace
  metric_name         = local.relayd_metrics.gaps
  dimensions          = local.feed_dimensions[each.key]
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = merge(local.tags, { "relayd:feed" = each.key })
}

# Gaps at the exchange (upstream): side=capture before relaying, side=emit after arbitration.
resource "aws_cloudwatch_metric_alarm" "upstream_gaps" {
  for_each = var.alarms.role_and_upstream_alarms ? var.feeds : {}

  alarm_name          = "${var.name}-relay-${each.key}-upstream-gaps"
  alarm_description   = "Feed ${each.key} of relay ${var.name}: sequence gaps at the exchange that customers will see (${local.relayd_metrics.upstream_gaps} rose)."
  namespace           = local.metrics_namespace
  metric_name         = local.relayd_metrics.upstream_gaps
  dimensions          = local.feed_dimensions[each.key]
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = merge(local.tags, { "relayd:feed" = each.key })
}

# Emitted but not yet acknowledged to the capture side, at the worst instance: a relay that
# falls behind, or ACKs that do not get back.
resource "aws_cloudwatch_metric_alarm" "ack_lag" {
  for_each = var.feeds

  alarm_name          = "${var.name}-relay-${each.key}-ack-lag"
  alarm_description   = "Feed ${each.key} of relay ${var.name}: more than ${var.alarms.max_ack_lag} datagrams emitted but not acknowledged for ${var.alarms.ack_lag_minutes} minutes (${local.relayd_metrics.ack_lag}, maximum over the group)."
  namespace           = local.metrics_namespace
  metric_name         = local.relayd_metrics.ack_lag
  dimensions          = local.feed_dimensions[each.key]
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = var.alarms.ack_lag_minutes
  datapoints_to_alarm = var.alarms.ack_lag_minutes
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarms.max_ack_lag
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = merge(local.tags, { "relayd:feed" = each.key })
}

# No instance is the feed's active emitter: no instance said it was active (the role gauge)
# at any scrape of the minute (the Maximum over the group is below 1). Without
# alarms.role_and_upstream_alarms (a relayd older than the gauge), no instance held a capture
# connection.
resource "aws_cloudwatch_metric_alarm" "no_active_emitter" {
  for_each = var.feeds

  alarm_name          = "${var.name}-relay-${each.key}-no-active-emitter"
  alarm_description   = "Feed ${each.key} of relay ${var.name}: no instance is emitting the feed (${var.alarms.role_and_upstream_alarms ? local.relayd_metrics.emit_active : local.relayd_metrics.active_connections}, maximum over the group, below 1)."
  namespace           = local.metrics_namespace
  metric_name         = var.alarms.role_and_upstream_alarms ? local.relayd_metrics.emit_active : local.relayd_metrics.active_connections
  dimensions          = local.feed_dimensions[each.key]
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 2
  datapoints_to_alarm = 2
  comparison_operator = "LessThanThreshold"
  threshold           = 1
  treat_missing_data  = "breaching"
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = merge(local.tags, { "relayd:feed" = each.key })
}

# Two active emitters for one feed (split brain): two sources on the customers' groups.
resource "aws_cloudwatch_metric_alarm" "split_brain" {
  for_each = var.alarms.role_and_upstream_alarms ? var.feeds : {}

  alarm_name          = "${var.name}-relay-${each.key}-split-brain"
  alarm_description   = "Feed ${each.key} of relay ${var.name}: more than one instance emits the feed (${local.relayd_metrics.emit_active}: instances in service times the share of samples saying active, above 1.5)."
  comparison_operator = "GreaterThanThreshold"
  threshold           = 1.5
  evaluation_periods  = 2
  datapoints_to_alarm = 2
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = merge(local.tags, { "relayd:feed" = each.key })

  # Each instance publishes the 0/1 gauge at every scrape: the share of samples that say
  # "active", times the instances in service, is the number of active emitters.
  metric_query {
    id          = "emitters"
    expression  = "IF(samples > 0, inservice * active / samples, 0)"
    label       = "active emitters"
    return_data = true
  }

  metric_query {
    id = "active"
    metric {
      namespace   = local.metrics_namespace
      metric_name = local.relayd_metrics.emit_active
      dimensions  = local.feed_dimensions[each.key]
      stat        = "Sum"
      period      = 60
    }
  }

  metric_query {
    id = "samples"
    metric {
      namespace   = local.metrics_namespace
      metric_name = local.relayd_metrics.emit_active
      dimensions  = local.feed_dimensions[each.key]
      stat        = "SampleCount"
      period      = 60
    }
  }

  metric_query {
    id = "inservice"
    metric {
      namespace   = "AWS/AutoScaling"
      metric_name = "GroupInServiceInstances"
      dimensions  = { AutoScalingGroupName = aws_autoscaling_group.this.name }
      stat        = "Maximum"
      period      = 60
    }
  }
}

# Lost redundancy: fewer healthy hosts in the feed's target group than the group wants.
resource "aws_cloudwatch_metric_alarm" "lost_redundancy" {
  for_each = var.feeds

  alarm_name          = "${var.name}-relay-${each.key}-lost-redundancy"
  alarm_description   = "Feed ${each.key} of relay ${var.name}: fewer healthy instances behind the NLB than the Auto Scaling group's desired capacity for ${var.alarms.redundancy_minutes} minutes."
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = var.alarms.redundancy_minutes
  datapoints_to_alarm = var.alarms.redundancy_minutes
  treat_missing_data  = "breaching"
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = merge(local.tags, { "relayd:feed" = each.key })

  metric_query {
    id          = "missing"
    expression  = "desired - healthy"
    label       = "desired minus healthy hosts"
    return_data = true
  }

  metric_query {
    id = "desired"
    metric {
      namespace   = "AWS/AutoScaling"
      metric_name = "GroupDesiredCapacity"
      dimensions  = { AutoScalingGroupName = aws_autoscaling_group.this.name }
      stat        = "Maximum"
      period      = 60
    }
  }

  metric_query {
    id = "healthy"
    metric {
      namespace   = "AWS/NetworkELB"
      metric_name = "HealthyHostCount"
      dimensions  = { LoadBalancer = aws_lb.this.arn_suffix, TargetGroup = aws_lb_target_group.feed[each.key].arn_suffix }
      stat        = "Minimum"
      period      = 60
    }
  }
}

################################################################################
# Dashboard: one per relay (that is, per environment)
################################################################################

locals {
  feed_names_sorted = sort(keys(var.feeds))

  # One row per feed: traffic, gaps, ACK lag, emitters, healthy hosts against desired.
  dashboard_widgets = flatten([for row, feed in local.feed_names_sorted : [
    {
      type = "metric", x = 0, y = row * 6, width = 6, height = 6
      properties = {
        title = "${feed}: datagrams per minute (all instances)", region = local.region, stat = "Sum", period = 60, view = "timeSeries"
        metrics = [
          [local.metrics_namespace, local.relayd_metrics.datagrams_out, "relay", var.name, "feed", feed, { label = "out (multicast)" }],
          [local.metrics_namespace, local.relayd_metrics.datagrams_in, "relay", var.name, "feed", feed, { label = "in (from the data centre)" }],
        ]
      }
    },
    {
      type = "metric", x = 6, y = row * 6, width = 6, height = 6
      properties = {
        title = "${feed}: gaps per minute", region = local.region, stat = "Sum", period = 60, view = "timeSeries"
        metrics = concat(
          [[local.metrics_namespace, local.relayd_metrics.gaps, "relay", var.name, "feed", feed, { label = "relay gaps" }]],
          var.alarms.role_and_upstream_alarms ? [[local.metrics_namespace, local.relayd_metrics.upstream_gaps, "relay", var.name, "feed", feed, { label = "upstream gaps" }]] : [],
        )
      }
    },
    {
      type = "metric", x = 12, y = row * 6, width = 6, height = 6
      properties = {
        title = "${feed}: ACK lag and capture streams", region = local.region, period = 60, view = "timeSeries"
        metrics = concat(
          [
            [local.metrics_namespace, local.relayd_metrics.ack_lag, "relay", var.name, "feed", feed, { stat = "Maximum", label = "ACK lag (max)" }],
            [local.metrics_namespace, local.relayd_metrics.active_connections, "relay", var.name, "feed", feed, { stat = "Maximum", label = "capture connections (max)", yAxis = "right" }],
          ],
          var.alarms.role_and_upstream_alarms ? [[local.metrics_namespace, local.relayd_metrics.emit_active, "relay", var.name, "feed", feed, { stat = "Maximum", label = "active emitter", yAxis = "right" }]] : [],
        )
      }
    },
    {
      type = "metric", x = 18, y = row * 6, width = 6, height = 6
      properties = {
        title = "${feed}: healthy hosts", region = local.region, period = 60, view = "timeSeries"
        metrics = [
          ["AWS/NetworkELB", "HealthyHostCount", "TargetGroup", aws_lb_target_group.feed[feed].arn_suffix, "LoadBalancer", aws_lb.this.arn_suffix, { stat = "Minimum", label = "healthy" }],
          ["AWS/AutoScaling", "GroupDesiredCapacity", "AutoScalingGroupName", aws_autoscaling_group.this.name, { stat = "Maximum", label = "desired" }],
          [local.metrics_namespace, local.relayd_metrics.feed_up, "relay", var.name, "feed", feed, { stat = "Sum", label = "relayd feed up (samples)", yAxis = "right" }],
        ]
      }
    },
  ]])

  # Every (namespace, metric) the dashboard draws.
  dashboard_metrics = distinct(flatten([for w in local.dashboard_widgets : [for m in w.properties.metrics : "${m[0]}/${m[1]}"]]))
}

resource "aws_cloudwatch_dashboard" "this" {
  dashboard_name = "${var.name}-relay"
  dashboard_body = jsonencode({ widgets = local.dashboard_widgets })
}

output "dashboard_name" {
  description = "The relay's CloudWatch dashboard (one row per feed)."
  value       = aws_cloudwatch_dashboard.this.dashboard_name
}

output "cloudwatch_metrics" {
  description = "relayd's metrics in CloudWatch: namespace, dimensions, and the metric names the alarms and the dashboard read (relayd-metrics.json)."
  value = {
    namespace  = local.metrics_namespace
    dimensions = local.metrics_file.dimensions
    metrics    = local.relayd_metrics
  }
}

output "feed_alarms" {
  description = "Per feed, the names of its alarms."
  value = { for name in keys(var.feeds) : name => sort(compact(concat(
    [for a in [aws_cloudwatch_metric_alarm.relay_gaps, aws_cloudwatch_metric_alarm.ack_lag, aws_cloudwatch_metric_alarm.no_active_emitter, aws_cloudwatch_metric_alarm.lost_redundancy, aws_cloudwatch_metric_alarm.healthy_hosts] : a[name].alarm_name],
    [for a in [aws_cloudwatch_metric_alarm.feed_silent, aws_cloudwatch_metric_alarm.upstream_gaps, aws_cloudwatch_metric_alarm.split_brain] : try(a[name].alarm_name, "")],
  ))) }
}
