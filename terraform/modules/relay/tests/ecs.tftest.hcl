# mode = "ecs" beside the default host mode: one AMI, the agent and the cluster only in ECS mode.

mock_provider "aws" {
  source = "../../tests/mocks/aws"

  mock_resource "aws_ecr_repository" {
    defaults = {
      arn            = "arn:aws:ecr:eu-west-2:111122223333:repository/relay/relayd"
      repository_url = "111122223333.dkr.ecr.eu-west-2.amazonaws.com/relay/relayd"
    }
  }

  mock_resource "aws_ecs_cluster" {
    defaults = {
      arn = "arn:aws:ecs:eu-west-2:111122223333:cluster/multicast"
      id  = "arn:aws:ecs:eu-west-2:111122223333:cluster/multicast"
    }
  }

  mock_resource "aws_ecs_capacity_provider" {
    defaults = {
      arn = "arn:aws:ecs:eu-west-2:111122223333:capacity-provider/relay-relay"
      id  = "arn:aws:ecs:eu-west-2:111122223333:capacity-provider/relay-relay"
    }
  }

  mock_resource "aws_ecs_task_definition" {
    defaults = {
      arn                  = "arn:aws:ecs:eu-west-2:111122223333:task-definition/relay-relayd:1"
      arn_without_revision = "arn:aws:ecs:eu-west-2:111122223333:task-definition/relay-relayd"
    }
  }

  mock_resource "aws_ecs_service" {
    defaults = {
      id = "arn:aws:ecs:eu-west-2:111122223333:service/multicast/relayd"
    }
  }
}

override_resource {
  target = aws_lb_target_group.feed["dev"]
  values = {
    arn        = "arn:aws:elasticloadbalancing:eu-west-2:111122223333:targetgroup/relay-dev/00000000000000d1"
    arn_suffix = "targetgroup/relay-dev/00000000000000d1"
  }
}

override_resource {
  target = aws_lb_target_group.feed["prod"]
  values = {
    arn        = "arn:aws:elasticloadbalancing:eu-west-2:111122223333:targetgroup/relay-prod/00000000000000e2"
    arn_suffix = "targetgroup/relay-prod/00000000000000e2"
  }
}

override_resource {
  target = aws_iam_role.ecs_task
  values = { arn = "arn:aws:iam::111122223333:role/relay-task" }
}

override_resource {
  target = aws_iam_role.ecs_execution
  values = { arn = "arn:aws:iam::111122223333:role/relay-exec" }
}

variables {
  name = "relay"
  vpc = {
    id         = "vpc-0123456789abcdef0"
    cidr_block = "10.50.0.0/16"
    subnet_ids = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  }
  feeds = {
    dev  = { port = 6666, groups = ["239.10.1.0/24"] }
    prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["/relayd/prod/key-1", "arn:aws:ssm:ap-northeast-1:111122223333:parameter/relayd/prod/key-2"] }
  }
  data_centre_cidrs = ["10.20.0.0/16"]
  instance          = { ami_id = "ami-0123456789abcdef0" }
}

run "host_mode_has_no_cluster_and_no_agent" {
  assert {
    condition     = var.mode == "host" && length(aws_ecs_cluster.this) == 0 && length(aws_ecs_service.relayd) == 0 && length(aws_ecs_capacity_provider.this) == 0 && length(aws_ecs_task_definition.relayd) == 0 && length(aws_ecr_repository.relayd) == 0
    error_message = "Host mode (the default) creates no ECS cluster, capacity provider, task definition, service or repository."
  }

  assert {
    condition     = !strcontains(output.user_data, "ecs.service") && !strcontains(output.user_data, "/etc/relayd/ecs-mode") && !strcontains(output.user_data, "ECS_CLUSTER=")
    error_message = "Host mode: the user data leaves the ECS agent off (no marker, no cluster, no start)."
  }

  assert {
    condition     = strcontains(output.user_data, "reload-or-restart relayd.service") && strcontains(output.user_data, "fetch_key 'prod'")
    error_message = "Host mode: the instance fetches the keys and runs relayd.service."
  }

  assert {
    condition     = alltrue([for tg in values(aws_lb_target_group.feed) : tg.target_type == "instance"]) && length(aws_autoscaling_group.this.target_group_arns) == 2 && !aws_autoscaling_group.this.protect_from_scale_in
    error_message = "Host mode: instance targets, registered by the Auto Scaling group."
  }

  assert {
    condition     = !contains(keys(aws_iam_role_policy_attachment.instance), "service-role/AmazonEC2ContainerServiceforEC2Role")
    error_message = "Host mode: the instance role has no ECS permission."
  }
}

run "ecs_mode" {
  variables {
    mode = "ecs"
    ecs  = { image_tag = "0.1.0" }
  }

  # The task definition, as ECS reads it.
  assert {
    condition     = aws_ecs_task_definition.relayd[0].network_mode == "awsvpc" && toset(aws_ecs_task_definition.relayd[0].requires_compatibilities) == toset(["EC2"])
    error_message = "The task runs on EC2 (Fargate has no multicast) with awsvpc networking."
  }

  assert {
    condition = contains(jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].systemControls, {
      namespace = "net.ipv4.conf.all.force_igmp_version", value = "2"
    })
    error_message = "The task forces IGMPv2 in its own network namespace (systemControls)."
  }

  assert {
    condition     = jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].image == "111122223333.dkr.ecr.eu-west-2.amazonaws.com/relay/relayd:0.1.0"
    error_message = "The task runs the given tag from the module's ECR repository."
  }

  assert {
    condition = (
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].logConfiguration.logDriver == "awslogs" &&
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].logConfiguration.options["awslogs-group"] == "/relayd/relay"
    )
    error_message = "The container logs to the relay's log group with awslogs."
  }

  assert {
    condition = (
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].healthCheck.command == ["CMD", "/opt/relayd/bin/relayd", "status", "--url", "http://127.0.0.1:8080", "--timeout", "3s"] &&
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].stopTimeout == 30 &&
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].ulimits == [{ name = "nofile", softLimit = 65536, hardLimit = 65536 }]
    )
    error_message = "Health check on the health port, a stop timeout and the descriptor limit of the systemd unit."
  }

  assert {
    condition = (
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].user == "10001:10001" &&
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].readonlyRootFilesystem &&
      !jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].privileged &&
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].linuxParameters.capabilities.drop == ["ALL"]
    )
    error_message = "relayd runs as the image's non-root user, on a read-only root, with no capability."
  }

  # The config and the keys: the host's relayd.toml with the task's interface, and one secret
  # per key parameter, in the order of RELAYD_KEY_FILES.
  assert {
    condition     = output.relayd_toml_ecs == replace(output.relayd_toml, "interface = \"ens5\"", "interface = \"eth0\"") && strcontains(output.relayd_toml_ecs, "interface = \"eth0\"")
    error_message = "The task's relayd.toml is the host one, sending out of eth0 (the task ENI)."
  }

  assert {
    condition = (
      { for e in jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].environment : e.name => e.value } == {
        RELAYD_CONFIG_TOML = output.relayd_toml_ecs
        RELAYD_KEY_FILES   = "/etc/relayd/keys/prod-1.key /etc/relayd/keys/prod-2.key"
      } &&
      jsondecode(aws_ecs_task_definition.relayd[0].container_definitions)[0].secrets == [
        { name = "RELAYD_KEY_1", valueFrom = "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-1" },
        { name = "RELAYD_KEY_2", valueFrom = "arn:aws:ssm:ap-northeast-1:111122223333:parameter/relayd/prod/key-2" },
      ]
    )
    error_message = "The config comes in RELAYD_CONFIG_TOML, each key as a secret from its SSM parameter, in file order."
  }

  # The roles: the execution role reads exactly the key parameters; the task role and the
  # instances read none.
  assert {
    condition = (
      one([for s in jsondecode(aws_iam_role_policy.ecs_execution[0].policy).Statement : s if s.Sid == "ReadFeedAuthKeys"]).Resource == [
        "arn:aws:ssm:ap-northeast-1:111122223333:parameter/relayd/prod/key-2",
        "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-1",
      ] &&
      one([for s in jsondecode(aws_iam_role_policy.ecs_execution[0].policy).Statement : s if s.Sid == "PullTheRelaydImage"]).Resource == ["arn:aws:ecr:eu-west-2:111122223333:repository/relay/relayd"]
    )
    error_message = "The execution role may read exactly the feeds' key parameters and pull only the relayd repository."
  }

  assert {
    condition     = aws_iam_role.ecs_task[0].arn != aws_iam_role.ecs_execution[0].arn && aws_ecs_task_definition.relayd[0].task_role_arn == aws_iam_role.ecs_task[0].arn && aws_ecs_task_definition.relayd[0].execution_role_arn == aws_iam_role.ecs_execution[0].arn
    error_message = "Separate task and execution roles."
  }

  assert {
    condition     = length([for s in jsondecode(aws_iam_role_policy.parameters[0].policy).Statement : s if s.Effect == "Allow"]) == 0 && !strcontains(output.user_data, "fetch_key")
    error_message = "In ECS mode the instances read no key: only the Deny of every other parameter stays."
  }

  # The service behind the feed target groups.
  assert {
    condition     = alltrue([for tg in values(aws_lb_target_group.feed) : tg.target_type == "ip" && tostring(tg.preserve_client_ip) == "true"])
    error_message = "ECS mode: ip targets (the task ENIs) with the client address preserved, so allowed_sources stays meaningful."
  }

  assert {
    condition = toset([for lb in aws_ecs_service.relayd[0].load_balancer : "${lb.target_group_arn}|${lb.container_port}|${lb.container_name}"]) == toset([
      "${aws_lb_target_group.feed["dev"].arn}|6666|relayd",
      "${aws_lb_target_group.feed["prod"].arn}|6667|relayd",
    ]) && length(aws_autoscaling_group.this.target_group_arns) == 0
    error_message = "The service registers its tasks with each feed's target group on the feed port; the group registers no instance."
  }

  assert {
    condition = (
      aws_ecs_service.relayd[0].deployment_circuit_breaker[0].enable && aws_ecs_service.relayd[0].deployment_circuit_breaker[0].rollback &&
      aws_ecs_service.relayd[0].desired_count == 2 &&
      one(aws_ecs_service.relayd[0].placement_constraints).type == "distinctInstance" &&
      [for s in aws_ecs_service.relayd[0].capacity_provider_strategy : s.capacity_provider] == [aws_ecs_capacity_provider.this[0].name]
    )
    error_message = "One task per instance on the capacity provider, with the circuit breaker rolling a failed deployment back."
  }

  assert {
    condition     = toset(aws_ecs_service.relayd[0].network_configuration[0].subnets) == toset(var.vpc.subnet_ids) && aws_ecs_service.relayd[0].network_configuration[0].security_groups == toset([aws_security_group.instance.id]) && !aws_ecs_service.relayd[0].network_configuration[0].assign_public_ip
    error_message = "The task ENIs are in the relay subnets (the multicast domain's) with the instance security group and no public address."
  }

  # The cluster and its capacity provider on the group.
  assert {
    condition = (
      aws_ecs_cluster.this[0].name == "multicast" &&
      aws_ecs_capacity_provider.this[0].auto_scaling_group_provider[0].auto_scaling_group_arn == aws_autoscaling_group.this.arn &&
      aws_ecs_capacity_provider.this[0].auto_scaling_group_provider[0].managed_termination_protection == "ENABLED" &&
      aws_ecs_capacity_provider.this[0].auto_scaling_group_provider[0].managed_scaling[0].status == "ENABLED" &&
      aws_autoscaling_group.this.protect_from_scale_in &&
      aws_autoscaling_group.this.instance_refresh[0].preferences[0].scale_in_protected_instances == "Refresh"
    )
    error_message = "The cluster's capacity provider manages the relay group (scaling, termination protection)."
  }

  assert {
    condition     = strcontains(output.user_data, "touch /etc/relayd/ecs-mode\necho 'ECS_CLUSTER=multicast' >> /etc/ecs/ecs.config\nsystemctl enable --now --no-block docker.service ecs.service\n") && strcontains(output.user_data, "systemctl disable --now relayd.service")
    error_message = "ECS mode: the user data names the cluster, starts the agent and stops relayd.service."
  }

  assert {
    condition     = contains(keys(aws_iam_role_policy_attachment.instance), "service-role/AmazonEC2ContainerServiceforEC2Role")
    error_message = "ECS mode: the instance role lets the agent register."
  }

  # The repository.
  assert {
    condition = (
      aws_ecr_repository.relayd[0].image_scanning_configuration[0].scan_on_push &&
      aws_ecr_repository.relayd[0].image_tag_mutability == "IMMUTABLE" &&
      aws_ecr_repository.relayd[0].encryption_configuration[0].encryption_type == "KMS" &&
      length(jsondecode(aws_ecr_lifecycle_policy.relayd[0].policy).rules) == 2
    )
    error_message = "The ECR repository scans on push, keeps tags immutable, is KMS-encrypted and has a lifecycle policy."
  }

  assert {
    condition     = aws_cloudwatch_metric_alarm.ecs_running_tasks[0].threshold == 2 && aws_cloudwatch_metric_alarm.ecs_running_tasks[0].dimensions.ServiceName == "relayd" && toset(keys(aws_cloudwatch_metric_alarm.ecs_utilization)) == toset(["cpu", "memory"])
    error_message = "ECS service alarms: running tasks below the desired count, CPU and memory."
  }
}

run "ecs_mode_needs_an_image_tag" {
  command = plan

  variables {
    mode = "ecs"
  }

  expect_failures = [var.ecs]
}

run "ecs_mode_takes_at_most_five_feeds" {
  command = plan

  variables {
    mode  = "ecs"
    ecs   = { image_tag = "0.1.0" }
    feeds = { for i in range(6) : "f${i}" => { port = 6000 + i, groups = ["239.10.${i}.0/24"] } }
  }

  expect_failures = [aws_ecs_service.relayd]
}

run "unknown_mode" {
  command = plan

  variables {
    mode = "fargate"
  }

  expect_failures = [var.mode]
}
