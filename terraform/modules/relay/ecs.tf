################################################################################
# mode = "ecs": relayd as an ECS service on the relay Auto Scaling group
################################################################################
#
# The same AMI as host mode; its user data starts the ECS agent instead of relayd.service
# (templates/user-data.sh.tftpl). One awsvpc task per instance (EC2 launch type: Fargate has
# no multicast), its ENI in the relay subnets (the ones associated with the multicast domain)
# with the instance security group, IGMPv2 forced in the task's own network namespace. The
# feed target groups take the task IPs with the client address preserved, so relayd's
# allowed_sources still sees the data centre. The feeds' keys reach the task as secrets that
# the agent reads from SSM with the execution role; neither the instances nor the task role
# read any parameter. ECR repository: ecr.tf.

locals {
  ecs = var.mode == "ecs"

  # What the instances themselves fetch: the keys in host mode, nothing in ECS mode.
  instance_auth_keys          = local.ecs ? [] : local.auth_keys
  instance_key_parameter_arns = local.ecs ? [] : local.auth_key_parameter_arns

  ecs_container     = "relayd"
  ecs_desired_count = coalesce(var.ecs.desired_count, var.instance.desired_capacity)
  ecs_image         = local.ecs ? "${aws_ecr_repository.relayd[0].repository_url}:${var.ecs.image_tag}" : ""

  # The task's relayd.toml: the host one, sending out of the task's ENI (eth0 in its own
  # network namespace) instead of the instance's primary interface.
  relayd_toml_ecs = replace(local.relayd_toml,
    "\ninterface = ${jsonencode(var.multicast_interface)}\n",
  "\ninterface = ${jsonencode(var.ecs.multicast_interface)}\n")

  # Key n of the task (RELAYD_KEY_<n>, written by the image's entrypoint to the n-th file of
  # RELAYD_KEY_FILES): the files relayd.toml names, the parameters as full ARNs.
  ecs_secrets = [for i, k in local.auth_keys : {
    name      = "RELAYD_KEY_${i + 1}"
    file      = k.file
    valueFrom = startswith(k.parameter, "arn:") ? k.parameter : "arn:${local.partition}:ssm:${local.region}:${local.account_id}:parameter/${trimprefix(k.parameter, "/")}"
  }]

  ecs_container_definition = {
    name                   = local.ecs_container
    image                  = local.ecs_image
    essential              = true
    user                   = "10001:10001" # container/Containerfile
    readonlyRootFilesystem = true
    privileged             = false
    cpu                    = var.ecs.cpu
    memory                 = var.ecs.memory
    portMappings = concat(
      [for name in sort(keys(var.feeds)) : { containerPort = var.feeds[name].port, protocol = "tcp" }],
      [{ containerPort = var.health_port, protocol = "tcp" }],
    )
    environment = concat(
      [{ name = "RELAYD_CONFIG_TOML", value = local.relayd_toml_ecs }],
      length(local.ecs_secrets) == 0 ? [] : [{ name = "RELAYD_KEY_FILES", value = join(" ", [for s in local.ecs_secrets : s.file]) }],
    )
    secrets = [for s in local.ecs_secrets : { name = s.name, valueFrom = s.valueFrom }]
    # The image's own HEALTHCHECK, on the configured health port.
    healthCheck = {
      command     = ["CMD", "/opt/relayd/bin/relayd", "status", "--url", "http://127.0.0.1:${var.health_port}", "--timeout", "3s"]
      interval    = 10
      timeout     = 5
      retries     = 3
      startPeriod = 30
    }
    # SIGTERM, then SIGKILL after this long: relayd says goodbye to its peers within 5 s.
    stopTimeout = var.ecs.stop_timeout
    ulimits     = [{ name = "nofile", softLimit = 65536, hardLimit = 65536 }]
    # Namespaced sysctls, set in the task's network namespace (the host's sysctl.d does not
    # reach it): IGMPv2 for the Transit Gateway's multicast domain.
    systemControls = [
      { namespace = "net.ipv4.conf.all.force_igmp_version", value = "2" },
      { namespace = "net.ipv4.conf.default.force_igmp_version", value = "2" },
    ]
    linuxParameters = {
      initProcessEnabled = true
      capabilities       = { drop = ["ALL"] }
      # The rendered config and the keys: memory only, relayd's alone (uid 10001).
      tmpfs = [{
        containerPath = "/run/relayd"
        size          = 16
        mountOptions  = ["rw", "noexec", "nosuid", "nodev", "mode=0700", "uid=10001", "gid=10001"]
      }]
    }
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        "awslogs-group"         = local.log_group_name
        "awslogs-region"        = local.region
        "awslogs-stream-prefix" = "ecs"
      }
    }
  }
}

resource "aws_ecs_cluster" "this" {
  count = local.ecs ? 1 : 0

  name = var.ecs_cluster_name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  tags = local.tags
}

# Managed scaling keeps the group as large as the tasks need; managed termination protection
# (with the group's scale-in protection) keeps it from removing an instance that runs a task,
# and managed draining moves the task before an instance refresh replaces the instance.
resource "aws_ecs_capacity_provider" "this" {
  count = local.ecs ? 1 : 0

  name = "${var.name}-relay"

  auto_scaling_group_provider {
    auto_scaling_group_arn         = aws_autoscaling_group.this.arn
    managed_termination_protection = "ENABLED"
    managed_draining               = "ENABLED"

    managed_scaling {
      status                    = "ENABLED"
      target_capacity           = 100
      minimum_scaling_step_size = 1
      maximum_scaling_step_size = 1
      instance_warmup_period    = 120
    }
  }

  tags = local.tags
}

resource "aws_ecs_cluster_capacity_providers" "this" {
  count = local.ecs ? 1 : 0

  cluster_name       = aws_ecs_cluster.this[0].name
  capacity_providers = [aws_ecs_capacity_provider.this[0].name]

  default_capacity_provider_strategy {
    capacity_provider = aws_ecs_capacity_provider.this[0].name
    weight            = 1
  }
}

resource "aws_ecs_task_definition" "relayd" {
  count = local.ecs ? 1 : 0

  family                   = "${var.name}-relayd"
  requires_compatibilities = ["EC2"]
  network_mode             = "awsvpc"
  execution_role_arn       = aws_iam_role.ecs_execution[0].arn
  task_role_arn            = aws_iam_role.ecs_task[0].arn
  container_definitions    = jsonencode([local.ecs_container_definition])
  tags                     = local.tags
}

resource "aws_ecs_service" "relayd" {
  count = local.ecs ? 1 : 0

  name            = "relayd"
  cluster         = aws_ecs_cluster.this[0].id
  task_definition = aws_ecs_task_definition.relayd[0].arn
  desired_count   = local.ecs_desired_count

  capacity_provider_strategy {
    capacity_provider = aws_ecs_capacity_provider.this[0].name
    weight            = 1
  }

  # One relay per instance, spread over the zones; a deployment replaces half of them at a
  # time (as the instance refresh does in host mode) and rolls back when the new tasks fail
  # their health checks.
  placement_constraints {
    type = "distinctInstance"
  }
  ordered_placement_strategy {
    type  = "spread"
    field = "attribute:ecs.availability-zone"
  }
  deployment_minimum_healthy_percent = 50
  deployment_maximum_percent         = 100
  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }
  health_check_grace_period_seconds = 60

  network_configuration {
    subnets          = var.vpc.subnet_ids
    security_groups  = [aws_security_group.instance.id]
    assign_public_ip = false
  }

  dynamic "load_balancer" {
    for_each = sort(keys(var.feeds))
    content {
      target_group_arn = aws_lb_target_group.feed[load_balancer.value].arn
      container_name   = local.ecs_container
      container_port   = var.feeds[load_balancer.value].port
    }
  }

  enable_ecs_managed_tags = true
  propagate_tags          = "SERVICE"
  enable_execute_command  = false

  lifecycle {
    precondition {
      condition     = length(var.feeds) <= 5
      error_message = "An ECS service registers with at most 5 target groups: mode = \"ecs\" takes at most 5 feeds per relay."
    }
  }

  depends_on = [aws_ecs_cluster_capacity_providers.this, aws_iam_role_policy.ecs_execution, aws_lb_listener.feed]
  tags       = local.tags
}

################################################################################
# Task and execution roles
################################################################################

locals {
  ecs_tasks_trust = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ecs-tasks.amazonaws.com" }
      Action    = "sts:AssumeRole"
      Condition = {
        StringEquals = { "aws:SourceAccount" = local.account_id }
        ArnLike      = { "aws:SourceArn" = "arn:${local.partition}:ecs:${local.region}:${local.account_id}:*" }
      }
    }]
  })
}

# relayd calls no AWS API: the task role has no permission at all (and the instance metadata
# service is closed to tasks, ECS_AWSVPC_BLOCK_IMDS in etc/ecs/ecs.config).
resource "aws_iam_role" "ecs_task" {
  count = local.ecs ? 1 : 0

  name_prefix        = "${var.name}-task-"
  description        = "relayd ${var.name} ECS task: no permissions (relayd calls no AWS API)"
  assume_role_policy = local.ecs_tasks_trust
  tags               = local.tags
}

# The agent's role for this task: pull the image, write the log, read the feeds' keys.
resource "aws_iam_role" "ecs_execution" {
  count = local.ecs ? 1 : 0

  name_prefix        = "${var.name}-exec-"
  description        = "relayd ${var.name} ECS task execution: image, log, feed keys"
  assume_role_policy = local.ecs_tasks_trust
  tags               = local.tags
}

resource "aws_iam_role_policy" "ecs_execution" {
  count = local.ecs ? 1 : 0

  name_prefix = "relayd-execution-"
  role        = aws_iam_role.ecs_execution[0].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      [
        {
          # Not restrictable to a resource: the token is for the registry as a whole.
          Sid      = "RegistryLogin"
          Effect   = "Allow"
          Action   = ["ecr:GetAuthorizationToken"]
          Resource = "*"
        },
        {
          Sid      = "PullTheRelaydImage"
          Effect   = "Allow"
          Action   = ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"]
          Resource = [aws_ecr_repository.relayd[0].arn]
        },
        {
          Sid      = "WriteTheRelayLog"
          Effect   = "Allow"
          Action   = ["logs:CreateLogStream", "logs:PutLogEvents"]
          Resource = ["${aws_cloudwatch_log_group.this.arn}:*"]
        },
      ],
      # The same key access the instances have in host mode: exactly these parameters, and a
      # customer managed key only through SSM and only for them.
      length(local.auth_key_parameter_arns) == 0 ? [] : [{
        Sid      = "ReadFeedAuthKeys"
        Effect   = "Allow"
        Action   = ["ssm:GetParameters"]
        Resource = local.auth_key_parameter_arns
      }],
      length(local.auth_key_parameter_arns) == 0 || length(var.auth_key_kms_key_arns) == 0 ? [] : [{
        Sid      = "DecryptFeedAuthKeysThroughSsm"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = sort(distinct(var.auth_key_kms_key_arns))
        Condition = {
          StringEquals = {
            "kms:ViaService"                      = [for r in local.auth_key_regions : "ssm.${r}.${data.aws_partition.current.dns_suffix}"]
            "kms:EncryptionContext:PARAMETER_ARN" = local.auth_key_parameter_arns
          }
        }
      }],
    )
  })
}

################################################################################
# ECS service alarms
################################################################################

# Container Insights' running task count below the desired count: a task that keeps failing
# (the circuit breaker stops the deployment) or an instance that cannot place one.
resource "aws_cloudwatch_metric_alarm" "ecs_running_tasks" {
  count = local.ecs ? 1 : 0

  alarm_name          = "${var.name}-relay-ecs-running-tasks"
  alarm_description   = "Fewer relayd tasks of relay ${var.name} run than the ${local.ecs_desired_count} wanted."
  namespace           = "ECS/ContainerInsights"
  metric_name         = "RunningTaskCount"
  dimensions          = { ClusterName = aws_ecs_cluster.this[0].name, ServiceName = aws_ecs_service.relayd[0].name }
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 3
  comparison_operator = "LessThanThreshold"
  threshold           = local.ecs_desired_count
  treat_missing_data  = "breaching"
  actions_enabled     = true
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = local.tags
}

# The service's CPU and memory against its reservation (AWS/ECS), the basic service alarms.
resource "aws_cloudwatch_metric_alarm" "ecs_utilization" {
  for_each = local.ecs ? { cpu = "CPUUtilization", memory = "MemoryUtilization" } : {}

  alarm_name          = "${var.name}-relay-ecs-${each.key}"
  alarm_description   = "The relayd tasks of relay ${var.name} use more than ${var.ecs.alarm_utilization_percent} % of their ${each.key} for 5 minutes."
  namespace           = "AWS/ECS"
  metric_name         = each.value
  dimensions          = { ClusterName = aws_ecs_cluster.this[0].name, ServiceName = aws_ecs_service.relayd[0].name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.ecs.alarm_utilization_percent
  treat_missing_data  = "missing"
  actions_enabled     = true
  alarm_actions       = [local.sns_topic_arn]
  ok_actions          = [local.sns_topic_arn]
  tags                = local.tags
}

################################################################################
# Outputs of ECS mode (null in host mode)
################################################################################

output "mode" {
  description = "How relayd runs: \"host\" (relayd.service) or \"ecs\" (an ECS service)."
  value       = var.mode
}

output "ecr_repository_url" {
  description = "ECR repository to push the relayd image to (tags are immutable)."
  value       = local.ecs ? aws_ecr_repository.relayd[0].repository_url : null
}

output "ecs_cluster_arn" {
  description = "ECS cluster of the relay instances."
  value       = local.ecs ? aws_ecs_cluster.this[0].arn : null
}

output "ecs_service_name" {
  description = "ECS service running relayd."
  value       = local.ecs ? aws_ecs_service.relayd[0].name : null
}

output "ecs_task_definition_arn" {
  description = "Task definition of the relayd service."
  value       = local.ecs ? aws_ecs_task_definition.relayd[0].arn : null
}

output "ecs_execution_role_arn" {
  description = "ECS task execution role (image pull, log, the feeds' key parameters)."
  value       = local.ecs ? aws_iam_role.ecs_execution[0].arn : null
}

output "ecs_task_role_arn" {
  description = "ECS task role (no permissions)."
  value       = local.ecs ? aws_iam_role.ecs_task[0].arn : null
}

output "relayd_toml_ecs" {
  description = "The relayd.toml the ECS task runs (RELAYD_CONFIG_TOML): relayd_toml with the task's interface."
  value       = local.relayd_toml_ecs
}
