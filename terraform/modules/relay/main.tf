data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

locals {
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.name
  account_id = data.aws_caller_identity.current.account_id

  tags = merge(var.tags, { "relayd:relay" = var.name })

  log_group_name         = "/relayd/${var.name}"
  metrics_log_group_name = "/relayd/${var.name}/metrics"

  # The preferred type first, then the fallbacks (all Nitro: multicast on Transit Gateway).
  instance_types = distinct(concat([var.instance.type], var.instance.fallback_types))

  # The single feed list, flattened for the security group rules.
  feed_sources = { for pair in setproduct(keys(var.feeds), var.data_centre_cidrs) :
    "${pair[0]}|${pair[1]}" => { feed = pair[0], cidr = pair[1], port = var.feeds[pair[0]].port }
  }
  all_groups = toset(flatten([for f in values(var.feeds) : f.groups]))

  # One active emitter per feed: each instance receives the others' multicast on the watched
  # groups' ports (the observer) and their beacons on the feed's listen port (relayd's
  # beacon_port default), sent from inside the relay VPC.
  peer_udp = { for pair in flatten([
    for name, f in var.feeds : [
      for port in distinct(concat([for w in f.watch_groups : tonumber(split(":", w)[1])], [f.port])) :
      { feed = name, port = port }
    ] if length(f.watch_groups) > 0
  ]) : "${pair.feed}|${pair.port}" => pair }

  # HELLO authentication keys: one file per configured SSM parameter, numbered from 1 within the
  # feed. A name is read in the instance's own region; an ARN in the region it names.
  auth_keys = flatten([for name in sort(keys(var.feeds)) : [
    for i, parameter in var.feeds[name].auth_key_parameters : {
      feed      = name
      file      = "/etc/relayd/keys/${name}-${i + 1}.key"
      parameter = parameter
      region    = startswith(parameter, "arn:") ? split(":", parameter)[3] : ""
    }
  ]])
  auth_key_files = { for name in keys(var.feeds) : name => [for k in local.auth_keys : k.file if k.feed == name] }

  # The exact parameter ARNs the instance role may read (a name becomes this region's ARN).
  auth_key_parameter_arns = sort(distinct([for k in local.auth_keys :
    startswith(k.parameter, "arn:") ? k.parameter : "arn:${local.partition}:ssm:${local.region}:${local.account_id}:parameter/${trimprefix(k.parameter, "/")}"
  ]))
  auth_key_regions = sort(distinct([for arn in local.auth_key_parameter_arns : split(":", arn)[3]]))

  # relayd.toml, rendered from the same feed list; see docs/CONFIG.md.
  relayd_toml = templatefile("${path.module}/templates/relayd.toml.tftpl", {
    log_level         = var.log_level
    health_listen     = "0.0.0.0:${var.health_port}"
    interface         = var.multicast_interface
    data_centre_cidrs = var.data_centre_cidrs
    feeds = [for name in sort(keys(var.feeds)) : {
      name            = name
      listen          = "0.0.0.0:${var.feeds[name].port}"
      ttl             = var.feeds[name].ttl
      max_connections = var.feeds[name].max_connections
      groups          = var.feeds[name].groups
      # Single ports render as TOML integers, ranges as strings.
      ports          = [for p in var.feeds[name].ports : can(tonumber(p)) ? tostring(tonumber(p)) : jsonencode(p)]
      auth_key_files = local.auth_key_files[name]
      watch_groups   = var.feeds[name].watch_groups
      arbitration    = var.feeds[name].arbitration
      deribit_layout = var.feeds[name].deribit_layout
      emitter_grace  = var.feeds[name].emitter_grace
    }]
  })

  user_data = templatefile("${path.module}/templates/user-data.sh.tftpl", {
    relayd_toml      = local.relayd_toml
    ecs_cluster_name = var.ecs_cluster_name
    auth_keys        = local.instance_auth_keys
    agent_config     = local.agent_config_rendered
    prometheus_yaml  = local.prometheus_yaml_rendered
    health_port      = var.health_port
    # The script is a file of its own (tests run it against stand-ins); its own "$${...}"
    # expansions must not be read as template syntax, hence file(), not templatefile().
    host_check_script   = file("${path.module}/files/relayd-host-check.sh")
    host_check_failures = var.host_health_check.failures
    host_check_interval = var.host_health_check.interval_seconds
    host_check_grace    = var.host_health_check.grace_period_seconds
    ecs_mode            = local.ecs
  })

  sns_topic_arn = var.alarms.sns_topic_arn != null ? var.alarms.sns_topic_arn : aws_sns_topic.alarms[0].arn
}

################################################################################
# Encryption key for the log group and the alarm topic
################################################################################

resource "aws_kms_key" "this" {
  description             = "relayd ${var.name}: log group and alarm topic"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministration"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogs"
        Effect    = "Allow"
        Principal = { Service = "logs.${local.region}.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnLike = {
            "kms:EncryptionContext:aws:logs:arn" = [for g in [local.log_group_name, local.metrics_log_group_name] : "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:${g}"]
          }
        }
      },
      {
        Sid       = "CloudWatchAlarmsPublishToTopic"
        Effect    = "Allow"
        Principal = { Service = "cloudwatch.amazonaws.com" }
        Action    = ["kms:Decrypt", "kms:GenerateDataKey*"]
        Resource  = "*"
        Condition = {
          StringEquals = { "aws:SourceAccount" = local.account_id }
        }
      },
    ]
  })
  tags = local.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/relayd-${var.name}"
  target_key_id = aws_kms_key.this.key_id
}

resource "aws_cloudwatch_log_group" "this" {
  name              = local.log_group_name
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

################################################################################
# Network Load Balancer: one TCP listener and target group per feed
################################################################################

resource "aws_lb" "this" {
  #checkov:skip=CKV_AWS_91:An NLB writes access logs only for TLS listeners; these are plain TCP (relayd frames its own stream), so the logs would stay empty. The access_logs input remains for a TLS listener.
  name                             = "${var.name}-nlb"
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = var.vpc.subnet_ids
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection

  dynamic "access_logs" {
    for_each = var.access_logs == null ? [] : [var.access_logs]
    content {
      bucket  = access_logs.value.bucket
      prefix  = access_logs.value.prefix
      enabled = true
    }
  }

  tags = local.tags
}

resource "aws_lb_target_group" "feed" {
  for_each = var.feeds

  # A generated name: a new port (or protocol) replaces the group, and the replacement must
  # exist before the listener lets go of the old one (create_before_destroy).
  name_prefix = "${substr(replace(each.key, "_", "-"), 0, 5)}-"
  vpc_id      = var.vpc.id
  target_type = local.ecs ? "ip" : "instance" # ECS mode: the tasks' awsvpc ENIs (ecs.tf)
  protocol    = "TCP"
  port        = each.value.port

  # relayd's allowed_sources sees the data-centre address only if the NLB keeps it.
  preserve_client_ip = true

  # A draining instance closes its streams at once so the capture side reconnects (and
  # resends from its replay buffer) instead of waiting out the default 300 s.
  deregistration_delay              = 15
  connection_termination            = true
  load_balancing_cross_zone_enabled = "use_load_balancer_configuration"

  # A dead instance is out after unhealthy_threshold x interval = 3 x 10 s = 30 s (each probe
  # times out after 5 s, within that window); three good probes (30 s) bring it back, which
  # keeps a flapping instance from taking streams.
  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = tostring(var.health_port)
    path                = "/healthz/${each.key}"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 3
    unhealthy_threshold = 3
  }

  tags = merge(local.tags, { "relayd:feed" = each.key, Name = "${var.name}-${each.key}" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "feed" {
  for_each = var.feeds

  load_balancer_arn = aws_lb.this.arn
  protocol          = "TCP"
  port              = each.value.port

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.feed[each.key].arn
  }

  tags = merge(local.tags, { "relayd:feed" = each.key })
}

################################################################################
# Security groups
################################################################################

resource "aws_security_group" "nlb" {
  name_prefix = "${var.name}-nlb-"
  description = "relayd ${var.name} NLB: feed ports from the data centre only"
  vpc_id      = var.vpc.id
  tags        = merge(local.tags, { Name = "${var.name}-nlb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "nlb_feed" {
  for_each = local.feed_sources

  security_group_id = aws_security_group.nlb.id
  description       = "relayd feed ${each.value.feed} from the data centre"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nlb_feed" {
  for_each = var.feeds

  security_group_id            = aws_security_group.nlb.id
  description                  = "relayd feed ${each.key} to the relay instances"
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
  referenced_security_group_id = aws_security_group.instance.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nlb_health" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Health checks to relayd"
  ip_protocol                  = "tcp"
  from_port                    = var.health_port
  to_port                      = var.health_port
  referenced_security_group_id = aws_security_group.instance.id
  tags                         = local.tags
}

resource "aws_security_group" "instance" {
  name_prefix = "${var.name}-instance-"
  description = "relayd ${var.name} instances: feeds from the data centre, health from the VPC, IGMP, multicast out"
  vpc_id      = var.vpc.id
  tags        = merge(local.tags, { Name = "${var.name}-instance" })

  lifecycle {
    create_before_destroy = true
  }
}

# Client IP preservation: the instances see the data-centre address, not the NLB's.
resource "aws_vpc_security_group_ingress_rule" "instance_feed" {
  for_each = local.feed_sources

  security_group_id = aws_security_group.instance.id
  description       = "relayd feed ${each.value.feed} from the data centre (client IP preserved by the NLB)"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "instance_health" {
  security_group_id = aws_security_group.instance.id
  description       = "relayd health port from the VPC (NLB health checks)"
  ip_protocol       = "tcp"
  from_port         = var.health_port
  to_port           = var.health_port
  cidr_ipv4         = var.vpc.cidr_block
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "instance_peer_multicast" {
  for_each = local.peer_udp

  security_group_id = aws_security_group.instance.id
  description       = "relayd feed ${each.value.feed}: the other relays' multicast and beacons (one active emitter)"
  ip_protocol       = "udp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = var.vpc.cidr_block
  tags              = local.tags
}

# The Transit Gateway sends its IGMP general queries from 0.0.0.0.
resource "aws_vpc_security_group_ingress_rule" "instance_igmp" {
  security_group_id = aws_security_group.instance.id
  description       = "IGMP queries from the multicast Transit Gateway"
  ip_protocol       = "2"
  cidr_ipv4         = "0.0.0.0/32"
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "instance_multicast" {
  for_each = local.all_groups

  security_group_id = aws_security_group.instance.id
  description       = "Multicast out to the feed groups"
  ip_protocol       = "udp"
  from_port         = 0
  to_port           = 65535
  cidr_ipv4         = each.value
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "instance_https" {
  for_each = toset(var.https_egress_cidrs)

  security_group_id = aws_security_group.instance.id
  description       = "HTTPS to AWS endpoints (SSM, CloudWatch, ECS)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
  tags              = local.tags
}

################################################################################
# Instance role: CloudWatch agent and SSM only
################################################################################

resource "aws_iam_role" "instance" {
  name_prefix = "${var.name}-relay-"
  description = "relayd ${var.name} instances"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "instance" {
  for_each = toset(concat(
    ["CloudWatchAgentServerPolicy", "AmazonSSMManagedInstanceCore"],
    var.attach_ecs_instance_policy || local.ecs ? ["service-role/AmazonEC2ContainerServiceforEC2Role"] : [],
  ))

  role       = aws_iam_role.instance.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/${each.value}"
}

# The feeds' authentication keys, and no other parameter. AmazonSSMManagedInstanceCore allows
# ssm:GetParameter(s) on every parameter of the account, so unless restrict_parameter_reads is
# off, a Deny takes back all parameter reads but these and the CloudWatch agent's own.
resource "aws_iam_role_policy" "parameters" {
  count = length(local.instance_key_parameter_arns) > 0 || var.restrict_parameter_reads ? 1 : 0

  name_prefix = "relayd-parameters-"
  role        = aws_iam_role.instance.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      length(local.instance_key_parameter_arns) == 0 ? [] : [{
        Sid      = "ReadFeedAuthKeys"
        Effect   = "Allow"
        Action   = ["ssm:GetParameter"]
        Resource = local.instance_key_parameter_arns
      }],
      # With the AWS managed key aws/ssm there is nothing to add: its key policy already lets
      # every principal of the account decrypt through SSM (and only through SSM).
      length(local.instance_key_parameter_arns) == 0 || length(var.auth_key_kms_key_arns) == 0 ? [] : [{
        Sid      = "DecryptFeedAuthKeysThroughSsm"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = sort(distinct(var.auth_key_kms_key_arns))
        Condition = {
          StringEquals = {
            "kms:ViaService"                      = [for r in local.auth_key_regions : "ssm.${r}.${data.aws_partition.current.dns_suffix}"]
            "kms:EncryptionContext:PARAMETER_ARN" = local.instance_key_parameter_arns
          }
        }
      }],
      var.restrict_parameter_reads ? [{
        Sid    = "NoOtherParameters"
        Effect = "Deny"
        Action = ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath", "ssm:GetParameterHistory"]
        NotResource = concat(local.instance_key_parameter_arns, [
          "arn:${local.partition}:ssm:*:${local.account_id}:parameter/AmazonCloudWatch-*",
        ])
      }] : [],
    )
  })
}

resource "aws_iam_instance_profile" "instance" {
  name_prefix = "${var.name}-relay-"
  role        = aws_iam_role.instance.name
  tags        = local.tags
}

################################################################################
# Launch template and Auto Scaling group
################################################################################

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-relay-"
  description            = "relayd ${var.name}"
  image_id               = var.instance.ami_id
  instance_type          = local.instance_types[0]
  update_default_version = true
  ebs_optimized          = true
  user_data              = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.instance.arn
  }

  network_interfaces {
    device_index                = 0
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.instance.id]
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  # One-minute EC2 metrics: the traffic alarms evaluate per minute.
  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_type           = "gp3"
      volume_size           = var.instance.root_volume_size
      encrypted             = true
      kms_key_id            = var.instance.ebs_kms_key_arn
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${var.name}-relay" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${var.name}-relay" })
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "this" {
  name_prefix         = "${var.name}-relay-"
  vpc_zone_identifier = var.vpc.subnet_ids
  min_size            = var.instance.min_size
  max_size            = var.instance.max_size
  desired_capacity    = var.instance.desired_capacity
  target_group_arns   = local.ecs ? [] : [for name in sort(keys(var.feeds)) : aws_lb_target_group.feed[name].arn]
  # ECS mode: the capacity provider's managed termination protection needs it.
  protect_from_scale_in = local.ecs

  # Instance health is the host and the relayd process, never one feed: EC2 status checks, and
  # the instance's own host check (relayd-host-check, see host_check.tf) that reports an
  # instance whose relayd does not answer as Unhealthy. A feed that is down on an instance
  # only leaves that feed's target group (and shows in the feed's alarms); with "ELB" here, one
  # feed's fault would replace instances that serve every other feed.
  health_check_type         = "EC2"
  health_check_grace_period = var.host_health_check.grace_period_seconds
  default_instance_warmup   = 60

  # The first type that has capacity, in order: no single instance type to run out of.
  mixed_instances_policy {
    instances_distribution {
      on_demand_allocation_strategy            = "prioritized"
      on_demand_base_capacity                  = 0
      on_demand_percentage_above_base_capacity = 100
    }

    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.this.id
        version            = aws_launch_template.this.latest_version
      }

      dynamic "override" {
        for_each = local.instance_types
        content {
          instance_type = override.value
        }
      }
    }
  }

  # Instances fetch their keys at boot and report their own health: the role's policies must
  # be in place first.
  depends_on = [aws_iam_role_policy.parameters, aws_iam_role_policy.host_health]

  # A new launch template version (AMI, feed list, user data) rolls through the group while at
  # least half of it keeps serving.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
      instance_warmup        = 60
      # ECS mode: instances running a task are protected from scale-in; replace them too
      # (managed draining moves the task first).
      scale_in_protected_instances = local.ecs ? "Refresh" : "Ignore"
    }
  }

  enabled_metrics = ["GroupInServiceInstances", "GroupDesiredCapacity", "GroupTotalInstances"]

  dynamic "tag" {
    for_each = merge(local.tags, { Name = "${var.name}-relay" }, local.ecs ? { AmazonECSManaged = "true" } : {})
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}

################################################################################
# Alarms
################################################################################

resource "aws_sns_topic" "alarms" {
  count = var.alarms.sns_topic_arn == null ? 1 : 0

  name              = "${var.name}-relay-alarms"
  kms_master_key_id = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_sns_topic_subscription" "email" {
  for_each = toset(var.alarms.email_endpoints)

  topic_arn = local.sns_topic_arn
  protocol  = "email"
  endpoint  = each.value
}

# The feed's target group has no healthy instance left: the feed is down in this region.
resource "aws_cloudwatch_metric_alarm" "healthy_hosts" {
  for_each = var.feeds

  alarm_name          = "${var.name}-relay-${each.key}-healthy-hosts"
  alarm_description   = "Feed ${each.key} of relay ${var.name} has no healthy instance behind the NLB."
  namespace           = "AWS/NetworkELB"
  metric_name         = "HealthyHostCount"
  dimensions          = { LoadBalancer = aws_lb.this.arn_suffix, TargetGroup = aws_lb_target_group.feed[each.key].arn_suffix }
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 2
  comparison_operator = "LessThanThreshold"
  threshold           = 1
  treat_missing_data  = "breaching"
  actions_enabled     = true
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = merge(local.tags, { "relayd:feed" = each.key })
}
