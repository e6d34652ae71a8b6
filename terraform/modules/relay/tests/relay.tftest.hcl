# Offline tests of the relay module: mock_provider "aws" plans and applies without AWS.

mock_provider "aws" {
  source = "../../tests/mocks/aws"
}

# Distinct target group ARNs, so a listener wired to the wrong group cannot pass.
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

variables {
  name = "relay"
  vpc = {
    id         = "vpc-0123456789abcdef0"
    cidr_block = "10.50.0.0/16"
    subnet_ids = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  }
  feeds = {
    dev  = { port = 6666, groups = ["239.10.1.0/24"] }
    prod = { port = 6667, groups = ["239.10.2.0/24", "239.10.3.0/24"], ports = ["5000-5099", "6000"] }
  }
  data_centre_cidrs = ["10.20.0.0/16", "192.168.10.0/24"]
  instance          = { ami_id = "ami-0123456789abcdef0" }
}

run "load_balancer" {
  assert {
    condition     = aws_lb.this.internal && aws_lb.this.load_balancer_type == "network" && aws_lb.this.enable_cross_zone_load_balancing
    error_message = "The NLB must be internal, of type network, with cross-zone load balancing on."
  }

  assert {
    condition     = toset(keys(aws_lb_listener.feed)) == toset(["dev", "prod"]) && toset(keys(aws_lb_target_group.feed)) == toset(["dev", "prod"])
    error_message = "There must be exactly one listener and one target group per feed."
  }

  assert {
    condition     = aws_lb_listener.feed["prod"].port == 6667 && aws_lb_listener.feed["prod"].protocol == "TCP"
    error_message = "The prod listener must be TCP on 6667."
  }

  assert {
    condition     = aws_lb_listener.feed["prod"].default_action[0].type == "forward" && aws_lb_listener.feed["prod"].default_action[0].target_group_arn == aws_lb_target_group.feed["prod"].arn
    error_message = "The listener on 6667 must forward to the prod target group."
  }

  assert {
    condition     = aws_lb_listener.feed["dev"].port == 6666 && aws_lb_listener.feed["dev"].default_action[0].target_group_arn == aws_lb_target_group.feed["dev"].arn
    error_message = "The listener on 6666 must forward to the dev target group."
  }

  assert {
    condition     = aws_lb_target_group.feed["prod"].port == 6667 && aws_lb_target_group.feed["prod"].protocol == "TCP" && aws_lb_target_group.feed["prod"].target_type == "instance"
    error_message = "The prod target group must be TCP 6667 with instance targets."
  }

  assert {
    condition = alltrue([for name, tg in aws_lb_target_group.feed :
      tg.health_check[0].protocol == "HTTP" && tg.health_check[0].port == "8080" && tg.health_check[0].path == "/healthz/${name}" && tg.health_check[0].matcher == "200"
    ])
    error_message = "Each target group must health-check HTTP on 8080 /healthz/<feed>."
  }

  assert {
    condition = alltrue([for tg in values(aws_lb_target_group.feed) :
      tg.health_check[0].interval * tg.health_check[0].unhealthy_threshold <= 30 && tg.health_check[0].timeout < tg.health_check[0].interval
    ])
    error_message = "A dead instance must leave the target group within 30 s."
  }

  assert {
    condition     = alltrue([for tg in values(aws_lb_target_group.feed) : tostring(tg.preserve_client_ip) == "true" && tg.connection_termination])
    error_message = "Target groups must preserve the client IP (relayd's allowed_sources) and close streams on deregistration."
  }
}

run "instances" {
  assert {
    condition     = length(toset(aws_autoscaling_group.this.vpc_zone_identifier)) >= 2
    error_message = "The Auto Scaling group must span at least two subnets."
  }

  assert {
    condition     = aws_autoscaling_group.this.health_check_type == "EC2" && aws_autoscaling_group.this.instance_refresh[0].strategy == "Rolling"
    error_message = "The group's health is the host's (EC2 plus the host check), never one feed's target group; rolling instance refresh."
  }

  assert {
    condition     = [for o in aws_autoscaling_group.this.mixed_instances_policy[0].launch_template[0].override : o.instance_type] == ["c6in.large", "c6i.large", "c5n.large"] && aws_autoscaling_group.this.mixed_instances_policy[0].instances_distribution[0].on_demand_allocation_strategy == "prioritized" && aws_autoscaling_group.this.mixed_instances_policy[0].launch_template[0].launch_template_specification[0].launch_template_id == aws_launch_template.this.id
    error_message = "The group launches the preferred type first and falls back to the others in order, all on demand."
  }

  assert {
    condition     = toset(aws_autoscaling_group.this.target_group_arns) == toset([for tg in values(aws_lb_target_group.feed) : tg.arn])
    error_message = "The group must register with every feed's target group."
  }

  assert {
    condition     = aws_launch_template.this.metadata_options[0].http_tokens == "required" && aws_launch_template.this.metadata_options[0].http_put_response_hop_limit == 1
    error_message = "The launch template must require IMDSv2 (tokens) with a hop limit of 1."
  }

  assert {
    condition     = alltrue([for b in aws_launch_template.this.block_device_mappings : tostring(b.ebs[0].encrypted) == "true"])
    error_message = "Every volume of the launch template must be encrypted."
  }

  assert {
    condition     = aws_launch_template.this.image_id == "ami-0123456789abcdef0" && !aws_launch_template.this.network_interfaces[0].associate_public_ip_address
    error_message = "Instances run the given AMI without a public address."
  }

  assert {
    condition     = strcontains(base64decode(aws_launch_template.this.user_data), output.relayd_toml)
    error_message = "The user data must write exactly the rendered relayd.toml."
  }

  assert {
    condition     = !strcontains(base64decode(aws_launch_template.this.user_data), "ECS_CLUSTER=") && strcontains(base64decode(aws_launch_template.this.user_data), "/etc/relayd/relayd.toml")
    error_message = "The user data must write /etc/relayd/relayd.toml and, in host mode, name no ECS cluster."
  }

  assert {
    condition     = toset([for a in aws_iam_role_policy_attachment.instance : a.policy_arn]) == toset(["arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy", "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"])
    error_message = "The instance role carries the CloudWatch agent and SSM policies, nothing else."
  }

  assert {
    condition     = aws_cloudwatch_log_group.this.retention_in_days == 365 && aws_cloudwatch_log_group.this.kms_key_id == aws_kms_key.this.arn
    error_message = "The log group keeps logs 365 days, encrypted with the module's key."
  }
}

run "security_groups" {
  assert {
    condition = toset([for r in aws_vpc_security_group_ingress_rule.instance_feed : "${r.from_port}-${r.to_port}/${r.ip_protocol}<${r.cidr_ipv4}"]) == toset([
      "6666-6666/tcp<10.20.0.0/16", "6666-6666/tcp<192.168.10.0/24",
      "6667-6667/tcp<10.20.0.0/16", "6667-6667/tcp<192.168.10.0/24",
    ])
    error_message = "The instances take each feed port from each data-centre CIDR and nothing else."
  }

  assert {
    condition     = toset([for r in aws_vpc_security_group_ingress_rule.nlb_feed : "${r.from_port}<${r.cidr_ipv4}"]) == toset(["6666<10.20.0.0/16", "6666<192.168.10.0/24", "6667<10.20.0.0/16", "6667<192.168.10.0/24"])
    error_message = "The NLB takes each feed port from each data-centre CIDR and nothing else."
  }

  assert {
    condition     = aws_vpc_security_group_ingress_rule.instance_health.from_port == 8080 && aws_vpc_security_group_ingress_rule.instance_health.to_port == 8080 && aws_vpc_security_group_ingress_rule.instance_health.cidr_ipv4 == "10.50.0.0/16"
    error_message = "The health port is open only from the VPC CIDR."
  }

  assert {
    condition     = aws_vpc_security_group_ingress_rule.instance_igmp.ip_protocol == "2" && aws_vpc_security_group_ingress_rule.instance_igmp.cidr_ipv4 == "0.0.0.0/32"
    error_message = "IGMP (protocol 2) must be allowed in from 0.0.0.0/32, where the Transit Gateway's queries come from."
  }

  assert {
    condition     = toset([for r in aws_vpc_security_group_egress_rule.instance_multicast : r.cidr_ipv4]) == toset(["239.10.1.0/24", "239.10.2.0/24", "239.10.3.0/24"]) && alltrue([for r in aws_vpc_security_group_egress_rule.instance_multicast : r.ip_protocol == "udp"])
    error_message = "Multicast egress is UDP to exactly the feed groups."
  }
}

run "alarms" {
  assert {
    condition = alltrue([for name, a in aws_cloudwatch_metric_alarm.healthy_hosts :
      a.metric_name == "HealthyHostCount" && a.namespace == "AWS/NetworkELB" && a.threshold == 1 && a.comparison_operator == "LessThanThreshold" && a.dimensions.TargetGroup == aws_lb_target_group.feed[name].arn_suffix
    ]) && length(aws_cloudwatch_metric_alarm.healthy_hosts) == 2
    error_message = "Each feed's target group must alarm on fewer than one healthy host."
  }

  assert {
    condition = alltrue([for name, a in aws_cloudwatch_metric_alarm.feed_silent :
      a.namespace == "relayd" && a.metric_name == "relayd_datagrams_out_total" && a.dimensions.relay == "relay" && a.dimensions.feed == name && length(a.dimensions) == 2 &&
      a.statistic == "Sum" && a.period == 60 && a.evaluation_periods == 5 && a.datapoints_to_alarm == 5 &&
      a.comparison_operator == "LessThanThreshold" && a.threshold == 1 && a.treat_missing_data == "breaching"
    ]) && toset(keys(aws_cloudwatch_metric_alarm.feed_silent)) == toset(["dev", "prod"])
    error_message = "Each feed alarms when its datagrams out, summed over every instance, stay at zero (or go missing) for 5 minutes."
  }

  assert {
    condition = alltrue([for name, a in aws_cloudwatch_metric_alarm.relay_gaps :
      a.metric_name == "relayd_gaps_total" && a.dimensions.feed == name && a.statistic == "Sum" && a.comparison_operator == "GreaterThanThreshold" && a.threshold == 0
    ]) && length(aws_cloudwatch_metric_alarm.relay_gaps) == 2
    error_message = "Each feed alarms on any relay gap."
  }

  assert {
    condition = alltrue([for name, a in aws_cloudwatch_metric_alarm.ack_lag :
      a.metric_name == "relayd_ack_lag" && a.dimensions.feed == name && a.statistic == "Maximum" && a.threshold == 100000 && a.evaluation_periods == 3
    ]) && length(aws_cloudwatch_metric_alarm.ack_lag) == 2
    error_message = "Each feed alarms on ACK lag above the limit at the worst instance."
  }

  assert {
    condition = alltrue([for name, a in aws_cloudwatch_metric_alarm.no_active_emitter :
      a.metric_name == "relayd_emit_active" && a.dimensions.feed == name && a.statistic == "Maximum" && a.comparison_operator == "LessThanThreshold" && a.threshold == 1 && a.treat_missing_data == "breaching"
    ]) && length(aws_cloudwatch_metric_alarm.no_active_emitter) == 2
    error_message = "By default, no active emitter means no instance says it is the feed's active emitter (the role gauge)."
  }

  assert {
    condition     = toset(keys(aws_cloudwatch_metric_alarm.upstream_gaps)) == toset(["dev", "prod"]) && alltrue([for a in values(aws_cloudwatch_metric_alarm.upstream_gaps) : a.metric_name == "relayd_upstream_gaps_total"]) && length(aws_cloudwatch_metric_alarm.split_brain) == 2
    error_message = "By default each feed alarms on upstream gaps and on two active emitters."
  }

  assert {
    condition = alltrue([for name, a in aws_cloudwatch_metric_alarm.lost_redundancy :
      a.comparison_operator == "GreaterThanOrEqualToThreshold" && a.threshold == 1 &&
      one([for q in a.metric_query : q.expression if q.return_data == true]) == "desired - healthy" &&
      one([for q in a.metric_query : q.metric[0].dimensions.TargetGroup if q.id == "healthy"]) == aws_lb_target_group.feed[name].arn_suffix &&
      one([for q in a.metric_query : q.metric[0].metric_name if q.id == "healthy"]) == "HealthyHostCount" &&
      one([for q in a.metric_query : q.metric[0].metric_name if q.id == "desired"]) == "GroupDesiredCapacity" &&
      one([for q in a.metric_query : q.metric[0].dimensions.AutoScalingGroupName if q.id == "desired"]) == aws_autoscaling_group.this.name
    ]) && length(aws_cloudwatch_metric_alarm.lost_redundancy) == 2
    error_message = "Each feed alarms when its target group has fewer healthy hosts than the group's desired capacity."
  }

  assert {
    # Every relayd metric an alarm reads is one relayd-metrics.json lists as existing today.
    condition = alltrue([for a in concat(values(aws_cloudwatch_metric_alarm.feed_silent), values(aws_cloudwatch_metric_alarm.relay_gaps), values(aws_cloudwatch_metric_alarm.ack_lag), values(aws_cloudwatch_metric_alarm.no_active_emitter)) :
      contains([for m in jsondecode(file("relayd-metrics.json")).metrics : m.name], a.metric_name)
    ])
    error_message = "An alarm reads a relayd metric that relayd-metrics.json does not list."
  }

  assert {
    condition = alltrue([for a in concat(values(aws_cloudwatch_metric_alarm.feed_silent), values(aws_cloudwatch_metric_alarm.relay_gaps), values(aws_cloudwatch_metric_alarm.ack_lag), values(aws_cloudwatch_metric_alarm.no_active_emitter), values(aws_cloudwatch_metric_alarm.lost_redundancy), values(aws_cloudwatch_metric_alarm.healthy_hosts)) :
      a.alarm_actions == toset([aws_sns_topic.alarms[0].arn]) && a.ok_actions == toset([aws_sns_topic.alarms[0].arn])
    ])
    error_message = "Every alarm must notify the module's SNS topic."
  }

  assert {
    # The dashboard draws only metrics relayd has (relayd-metrics.json) or AWS publishes.
    condition = alltrue([for w in jsondecode(aws_cloudwatch_dashboard.this.dashboard_body).widgets : alltrue([for m in w.properties.metrics :
      m[0] == "relayd" ? contains([for x in jsondecode(file("relayd-metrics.json")).metrics : x.name], m[1]) : contains(["AWS/NetworkELB/HealthyHostCount", "AWS/AutoScaling/GroupDesiredCapacity"], "${m[0]}/${m[1]}")
    ])]) && length(jsondecode(aws_cloudwatch_dashboard.this.dashboard_body).widgets) == 8
    error_message = "The dashboard has one row of four widgets per feed, on metrics that exist."
  }

  assert {
    condition     = contains([for w in jsondecode(aws_cloudwatch_dashboard.this.dashboard_body).widgets : w.properties.title], "prod: datagrams per minute (all instances)") && aws_cloudwatch_dashboard.this.dashboard_name == "relay-relay"
    error_message = "The dashboard is the relay's own and has a traffic widget per feed."
  }

  assert {
    condition     = aws_sns_topic.alarms[0].kms_master_key_id == aws_kms_key.this.arn
    error_message = "The alarm topic must be encrypted with the module's key."
  }
}

run "rendered_toml" {
  command = plan

  assert {
    condition     = strcontains(output.relayd_toml, "[health]\nlisten = \"0.0.0.0:8080\"\n")
    error_message = "The health server listens on 0.0.0.0:8080."
  }

  assert {
    condition     = strcontains(output.relayd_toml, "name = \"prod\"\nlisten = \"0.0.0.0:6667\"\ninterface = \"ens5\"\n")
    error_message = "The prod feed listens on 0.0.0.0:6667 and emits on ens5."
  }

  assert {
    condition     = strcontains(output.relayd_toml, "allowed_sources = [\"10.20.0.0/16\", \"192.168.10.0/24\"]\nallowed_groups = [\"239.10.2.0/24\", \"239.10.3.0/24\"]\nallowed_ports = [\"5000-5099\", 6000]\n")
    error_message = "allowed_sources, allowed_groups and allowed_ports come from the inputs."
  }

  assert {
    condition     = length(regexall("\\[\\[emit\\]\\]", output.relayd_toml)) == 2
    error_message = "One [[emit]] table per feed."
  }
}

run "ecs_policy_opt_in" {
  command = plan

  variables {
    attach_ecs_instance_policy = true
    ecs_cluster_name           = "relay-tokyo"
  }

  assert {
    condition     = contains(keys(aws_iam_role_policy_attachment.instance), "service-role/AmazonEC2ContainerServiceforEC2Role") && length(aws_iam_role_policy_attachment.instance) == 3
    error_message = "attach_ecs_instance_policy adds the ECS instance policy and nothing more."
  }

  assert {
    condition     = !strcontains(output.user_data, "ECS_CLUSTER=") && !strcontains(output.user_data, "ecs.service")
    error_message = "Host mode: the user data names no cluster and leaves the ECS agent off (tests/ecs.tftest.hcl has ECS mode)."
  }
}

run "existing_topic" {
  command = plan

  variables {
    alarms = { sns_topic_arn = "arn:aws:sns:eu-west-2:111122223333:ops-pager" }
  }

  assert {
    condition     = length(aws_sns_topic.alarms) == 0 && alltrue([for a in values(aws_cloudwatch_metric_alarm.healthy_hosts) : a.alarm_actions == toset(["arn:aws:sns:eu-west-2:111122223333:ops-pager"])])
    error_message = "A given topic is used and none is created."
  }
}

run "unauthenticated_feeds" {
  command = plan

  assert {
    condition     = !strcontains(output.relayd_toml, "auth_key_files") && !strcontains(output.user_data, "fetch_key") && !strcontains(output.user_data, "aws ssm")
    error_message = "Without auth_key_parameters no feed lists key files and the user data fetches nothing."
  }

  assert {
    condition = alltrue([for s in jsondecode(aws_iam_role_policy.parameters[0].policy).Statement : s.Effect == "Deny"]) && toset(jsondecode(aws_iam_role_policy.parameters[0].policy).Statement[0].NotResource) == toset([
      "arn:aws:ssm:*:111122223333:parameter/AmazonCloudWatch-*",
    ])
    error_message = "Without keys the role reads no parameter but the CloudWatch agent's: the policy only denies."
  }
}

run "parameter_reads_unrestricted" {
  command = plan

  variables {
    restrict_parameter_reads = false
  }

  assert {
    condition     = length(aws_iam_role_policy.parameters) == 0
    error_message = "No keys and no restriction: no parameter policy at all."
  }
}

run "authenticated_feed" {
  variables {
    feeds = {
      dev  = { port = 6666, groups = ["239.10.1.0/24"] }
      prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["/relayd/prod/key-1", "/relayd/prod/key-2"] }
    }
  }

  assert {
    condition     = strcontains(one([for s in split("[[emit]]", output.relayd_toml) : s if strcontains(s, "name = \"prod\"")]), "\nauth_key_files = [\"/etc/relayd/keys/prod-1.key\", \"/etc/relayd/keys/prod-2.key\"]\n")
    error_message = "The authenticated feed lists one key file per parameter, in order, in its own [[emit]] table."
  }

  assert {
    condition     = !strcontains(one([for s in split("[[emit]]", output.relayd_toml) : s if strcontains(s, "name = \"dev\"")]), "auth_key_files") && length(regexall("auth_key_files", output.relayd_toml)) == 1
    error_message = "The unauthenticated feed lists no key files."
  }

  assert {
    # The Allow statements of the parameter policy, and every other statement's effect.
    condition = [for s in jsondecode(aws_iam_role_policy.parameters[0].policy).Statement : s if s.Effect == "Allow"] == [{
      Sid      = "ReadFeedAuthKeys"
      Effect   = "Allow"
      Action   = ["ssm:GetParameter"]
      Resource = ["arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-1", "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-2"]
    }]
    error_message = "The role may read exactly the configured parameters, nothing else, and gets no KMS statement with the AWS managed key."
  }

  assert {
    condition = toset(one([for s in jsondecode(aws_iam_role_policy.parameters[0].policy).Statement : s.NotResource if s.Effect == "Deny"])) == toset([
      "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-1",
      "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd/prod/key-2",
      "arn:aws:ssm:*:111122223333:parameter/AmazonCloudWatch-*",
    ]) && contains(one([for s in jsondecode(aws_iam_role_policy.parameters[0].policy).Statement : s.Action if s.Effect == "Deny"]), "ssm:GetParameters")
    error_message = "Every other parameter read (which AmazonSSMManagedInstanceCore would allow) is denied."
  }

  assert {
    condition     = aws_iam_role_policy.parameters[0].role == aws_iam_role.instance.id && aws_autoscaling_group.this.mixed_instances_policy[0].launch_template[0].launch_template_specification[0].launch_template_id == aws_launch_template.this.id
    error_message = "The parameter policy belongs to the instance role."
  }

  assert {
    # Both keys are fetched (in this region: no region argument) before relayd.toml is written.
    condition     = strcontains(split("cat > /etc/relayd/relayd.toml.new", output.user_data)[0], "\nfetch_key 'prod' '/etc/relayd/keys/prod-1.key' '' '/relayd/prod/key-1' || true\nfetch_key 'prod' '/etc/relayd/keys/prod-2.key' '' '/relayd/prod/key-2' || true\n") && !strcontains(output.user_data, "fetch_key 'dev'")
    error_message = "The user data fetches each parameter of the feed, in order, before it writes relayd.toml."
  }

  assert {
    condition     = length(regexall("(?m)^\\s*set\\s+-[a-z]*x|set\\s+-o\\s+xtrace|bash\\s+-x", output.user_data)) == 0 && strcontains(output.user_data, "--with-decryption --query Parameter.Value --output text >\"$tmp\"")
    error_message = "The user data never traces its commands and sends the key value only into the temporary file."
  }

  assert {
    condition     = strcontains(output.user_data, "chown relayd:relayd \"$tmp\" && chmod 0400 \"$tmp\" && mv -f \"$tmp\" \"$file\"") && strcontains(output.user_data, "install -d -m 0700 -o relayd -g relayd /etc/relayd/keys")
    error_message = "Key files become 0400 relayd:relayd by rename, in the 0700 key directory."
  }

  assert {
    condition     = strcontains(base64decode(aws_launch_template.this.user_data), "fetch_key 'prod'")
    error_message = "The launch template carries the key-fetching user data."
  }
}

run "customer_managed_key_and_arns" {
  command = plan

  variables {
    feeds = {
      dev  = { port = 6666, groups = ["239.10.1.0/24"], auth_key_parameters = ["relayd-dev-key"] }
      prod = { port = 6667, groups = ["239.10.2.0/24"], auth_key_parameters = ["arn:aws:ssm:ap-northeast-1:444455556666:parameter/relayd/prod/key-1", "relayd-dev-key"] }
    }
    auth_key_kms_key_arns = ["arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"]
  }

  assert {
    condition = one([for s in jsondecode(aws_iam_role_policy.parameters[0].policy).Statement : s.Resource if s.Sid == "ReadFeedAuthKeys"]) == [
      "arn:aws:ssm:ap-northeast-1:444455556666:parameter/relayd/prod/key-1",
      "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd-dev-key",
    ]
    error_message = "An ARN is used as given, a name becomes this region's ARN, and a parameter shared by two feeds is granted once."
  }

  assert {
    condition = [for s in jsondecode(aws_iam_role_policy.parameters[0].policy).Statement : s if s.Sid == "DecryptFeedAuthKeysThroughSsm"] == [{
      Sid      = "DecryptFeedAuthKeysThroughSsm"
      Effect   = "Allow"
      Action   = ["kms:Decrypt"]
      Resource = ["arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"]
      Condition = {
        StringEquals = {
          "kms:ViaService"                      = ["ssm.ap-northeast-1.amazonaws.com", "ssm.eu-west-2.amazonaws.com"]
          "kms:EncryptionContext:PARAMETER_ARN" = ["arn:aws:ssm:ap-northeast-1:444455556666:parameter/relayd/prod/key-1", "arn:aws:ssm:eu-west-2:111122223333:parameter/relayd-dev-key"]
        }
      }
    }]
    error_message = "With a customer managed key the role may decrypt with that key only, only through SSM in the parameters' regions, and only for these parameters."
  }

  assert {
    condition     = strcontains(output.user_data, "fetch_key 'prod' '/etc/relayd/keys/prod-1.key' 'ap-northeast-1' 'arn:aws:ssm:ap-northeast-1:444455556666:parameter/relayd/prod/key-1' || true\nfetch_key 'prod' '/etc/relayd/keys/prod-2.key' '' 'relayd-dev-key' || true\n") && strcontains(output.user_data, "fetch_key 'dev' '/etc/relayd/keys/dev-1.key' '' 'relayd-dev-key' || true\n")
    error_message = "An ARN is fetched in the region it names; each feed numbers its own key files."
  }

  assert {
    condition     = strcontains(output.relayd_toml, "auth_key_files = [\"/etc/relayd/keys/dev-1.key\"]\n") && strcontains(output.relayd_toml, "auth_key_files = [\"/etc/relayd/keys/prod-1.key\", \"/etc/relayd/keys/prod-2.key\"]\n")
    error_message = "Each authenticated feed lists its own key files."
  }
}

run "metrics_reach_cloudwatch" {
  command = plan

  assert {
    # The agent scrapes relayd's /metrics on the health port every 30 s, each sample labelled with the relay.
    condition = yamldecode(local.prometheus_yaml_rendered).scrape_configs == [{
      job_name       = "relayd"
      metrics_path   = "/metrics"
      sample_limit   = 10000
      static_configs = [{ targets = ["127.0.0.1:8080"], labels = { relay = "relay" } }]
    }] && yamldecode(local.prometheus_yaml_rendered).global.scrape_interval == "30s"
    error_message = "The CloudWatch agent must scrape relayd's /metrics on the health port, labelled with the relay's name."
  }

  assert {
    # EMF: namespace relayd, dimensions relay and feed, exactly the metrics the alarms and the dashboard read.
    condition = jsonencode(one(jsondecode(local.agent_config_rendered).logs.metrics_collected.prometheus.emf_processor.metric_declaration)) == jsonencode({
      dimensions       = [["relay", "feed"]]
      label_matcher    = "^relayd$"
      metric_selectors = sort([for m in jsondecode(file("relayd-metrics.json")).metrics : "^${m.name}$"])
      source_labels    = ["job"]
    }) && jsondecode(local.agent_config_rendered).logs.metrics_collected.prometheus.emf_processor.metric_namespace == "relayd"
    error_message = "The agent must ship every listed relayd metric under namespace relayd with the relay and feed dimensions."
  }

  assert {
    condition     = jsondecode(local.agent_config_rendered).logs.metrics_collected.prometheus.log_group_name == aws_cloudwatch_log_group.metrics.name && aws_cloudwatch_log_group.metrics.kms_key_id == aws_kms_key.this.arn && one(jsondecode(local.agent_config_rendered).logs.logs_collected.files.collect_list).log_group_name == "/relayd/relay"
    error_message = "Metrics go to the relay's encrypted metrics log group, relayd's log to its log group."
  }

  assert {
    condition     = strcontains(output.user_data, "\n${local.agent_config_rendered}\nRELAYD_AGENT_END\n") && strcontains(output.user_data, "\n${local.prometheus_yaml_rendered}\nRELAYD_PROMETHEUS_END\n")
    error_message = "The user data writes exactly these agent and scrape configurations."
  }

  assert {
    condition = toset([for g in jsondecode(aws_kms_key.this.policy).Statement[1].Condition.ArnLike["kms:EncryptionContext:aws:logs:arn"] : g]) == toset([
      "arn:aws:logs:eu-west-2:111122223333:log-group:/relayd/relay",
      "arn:aws:logs:eu-west-2:111122223333:log-group:/relayd/relay/metrics",
    ])
    error_message = "CloudWatch Logs may use the key for exactly the relay's two log groups."
  }

  assert {
    condition     = one([for st in jsondecode(aws_kms_key.this.policy).Statement : st.Condition if st.Sid == "CloudWatchAlarmsPublishToTopic"]) == { StringEquals = { "aws:SourceAccount" = "111122223333" } }
    error_message = "CloudWatch may use the key for the alarm topic only on behalf of this account (aws:SourceAccount)."
  }
}

run "alarms_for_a_relayd_without_role_and_upstream_metrics" {
  command = plan

  variables {
    alarms = { role_and_upstream_alarms = false, quiet_feeds = ["dev"] }
  }

  assert {
    condition     = length(aws_cloudwatch_metric_alarm.upstream_gaps) == 0 && length(aws_cloudwatch_metric_alarm.split_brain) == 0
    error_message = "Without role_and_upstream_alarms, no alarm reads the role gauge or the upstream gaps."
  }

  assert {
    condition = alltrue([for name, a in aws_cloudwatch_metric_alarm.no_active_emitter :
      a.metric_name == "relayd_active_connections" && a.dimensions.feed == name && a.treat_missing_data == "breaching"
    ]) && length(aws_cloudwatch_metric_alarm.no_active_emitter) == 2
    error_message = "Without the role gauge, no active emitter means no instance holds a capture connection."
  }

  assert {
    condition     = keys(aws_cloudwatch_metric_alarm.feed_silent) == ["prod"]
    error_message = "A quiet feed has no silence alarm."
  }
}

# Health is the host's: the host check reports only when relayd itself stops answering.
run "feed_isolation" {
  command = plan

  assert {
    condition     = aws_autoscaling_group.this.health_check_type == "EC2" && aws_autoscaling_group.this.health_check_grace_period == 180
    error_message = "No ELB health checks: a feed that is down must not replace instances that serve the others."
  }

  assert {
    condition     = strcontains(output.user_data, "ExecStart=/usr/local/sbin/relayd-host-check 8080 4\n") && strcontains(output.user_data, "OnUnitActiveSec=30\n") && strcontains(output.user_data, file("files/relayd-host-check.sh")) && strcontains(output.user_data, "systemctl enable --now relayd-host-check.timer")
    error_message = "The user data installs the host check with the health port, the failure count and the interval."
  }

  assert {
    condition = jsondecode(aws_iam_role_policy.host_health.policy).Statement == [{
      Sid       = "ReportOwnHealth"
      Effect    = "Allow"
      Action    = ["autoscaling:SetInstanceHealth"]
      Resource  = "arn:aws:autoscaling:eu-west-2:111122223333:autoScalingGroup:*:autoScalingGroupName/*"
      Condition = { StringEquals = { "autoscaling:ResourceTag/relayd:relay" = "relay" } }
    }] && aws_iam_role_policy.host_health.role == aws_iam_role.instance.id
    error_message = "The instances may set the health of instances in their own group only."
  }

  assert {
    condition     = contains([for t in aws_autoscaling_group.this.tag : "${t.key}=${t.value}" if t.propagate_at_launch], "relayd:relay=relay")
    error_message = "The group carries the tag the health policy is conditioned on."
  }
}

run "user_data_order" {
  command = plan

  assert {
    # relayd is reloaded onto the rendered config before anything optional can fail.
    condition     = length(split("systemctl --no-block reload-or-restart relayd.service", split("amazon-cloudwatch-agent-ctl", output.user_data)[0])) == 2 && length(split("mv -f /etc/relayd/relayd.toml.new", split("reload-or-restart relayd.service", output.user_data)[0])) == 2
    error_message = "The user data writes relayd.toml, reloads relayd, and only then configures the CloudWatch agent."
  }

  assert {
    condition     = strcontains(output.user_data, "if ! /opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl") && !strcontains(output.user_data, "install -d -m 0755 /etc/relayd")
    error_message = "A CloudWatch agent failure does not stop the script (set -e), and /etc/relayd keeps the AMI's 0750."
  }
}

# A feed's port changes: the target group is replaced (a generated name, so the new one can
# exist beside the old), the listener and the group follow it.
run "port_before" {
  assert {
    condition     = aws_lb_target_group.feed["prod"].name_prefix == "prod-" && aws_lb_target_group.feed["prod"].port == 6667 && aws_lb_target_group.feed["prod"].tags["Name"] == "relay-prod"
    error_message = "Target groups have a generated name from a prefix."
  }
}

run "port_changed" {
  variables {
    feeds = {
      dev  = { port = 6666, groups = ["239.10.1.0/24"] }
      prod = { port = 7667, groups = ["239.10.2.0/24", "239.10.3.0/24"], ports = ["5000-5099", "6000"] }
    }
  }

  assert {
    condition     = aws_lb_target_group.feed["prod"].port == 7667 && aws_lb_listener.feed["prod"].port == 7667 && aws_lb_listener.feed["prod"].default_action[0].target_group_arn == aws_lb_target_group.feed["prod"].arn
    error_message = "After the port change the listener on 7667 forwards to the prod target group on 7667."
  }

  assert {
    condition     = contains(aws_autoscaling_group.this.target_group_arns, aws_lb_target_group.feed["prod"].arn) && strcontains(output.relayd_toml, "listen = \"0.0.0.0:7667\"")
    error_message = "The group registers with the new target group and relayd listens on the new port."
  }
}

run "egress_endpoints" {
  command = plan

  assert {
    condition = toset([for e in aws_vpc_endpoint.interface : e.service_name]) == toset([for s in ["ssm", "ssmmessages", "ec2messages", "logs", "monitoring", "kms", "sts"] : "com.amazonaws.eu-west-2.${s}"]) && alltrue([for e in aws_vpc_endpoint.interface :
      e.private_dns_enabled && e.vpc_endpoint_type == "Interface" && toset(e.subnet_ids) == toset(["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]) && e.vpc_id == "vpc-0123456789abcdef0"
    ])
    error_message = "By default the relay VPC gets interface endpoints with private DNS for SSM, its message channels, CloudWatch Logs and metrics, KMS and STS."
  }

  assert {
    condition     = aws_vpc_security_group_ingress_rule.endpoints_https[0].from_port == 443 && aws_vpc_security_group_ingress_rule.endpoints_https[0].to_port == 443 && aws_vpc_security_group_ingress_rule.endpoints_https[0].ip_protocol == "tcp" && aws_vpc_security_group_egress_rule.instance_endpoints[0].from_port == 443
    error_message = "The endpoints admit HTTPS only, from the relay instances, which may reach them."
  }
}

run "egress_endpoints_off" {
  command = plan

  variables {
    vpc_endpoints = { enabled = false }
  }

  assert {
    condition     = length(aws_vpc_endpoint.interface) == 0 && length(aws_security_group.endpoints) == 0
    error_message = "vpc_endpoints.enabled = false creates no endpoint."
  }
}

run "one_active_emitter_keys" {
  command = plan

  variables {
    feeds = {
      dev = { port = 6666, groups = ["239.10.1.0/24"] }
      prod = {
        port          = 6667
        groups        = ["239.10.2.0/24"]
        ports         = ["5000-5099"]
        watch_groups  = ["239.10.2.1:5000", "239.10.2.2:5001"]
        arbitration   = "deribit"
        emitter_grace = "2s"
      }
    }
  }

  assert {
    condition     = strcontains(output.relayd_toml, "watch_groups = [\"239.10.2.1:5000\", \"239.10.2.2:5001\"]\nemitter_grace = \"2s\"\narbitration = \"deribit\"\nderibit_layout = \"frame-v1\"\n")
    error_message = "watch_groups, emitter_grace, arbitration and deribit_layout render into the prod feed's [[emit]] table."
  }

  assert {
    condition     = length(regexall("watch_groups|arbitration|emitter_grace", output.relayd_toml)) == 3
    error_message = "A feed without them (dev) renders none of the keys: relayd's defaults apply."
  }

  assert {
    condition     = toset(keys(aws_vpc_security_group_ingress_rule.instance_peer_multicast)) == toset(["prod|5000", "prod|5001", "prod|6667"])
    error_message = "The instances admit the other relays' UDP on the watched ports and the beacon port (the listen port) of the feed that watches, and nothing for a feed that does not."
  }

  assert {
    condition     = alltrue([for r in values(aws_vpc_security_group_ingress_rule.instance_peer_multicast) : r.ip_protocol == "udp" && r.cidr_ipv4 == "10.50.0.0/16" && r.from_port == r.to_port])
    error_message = "Peer multicast is UDP from the relay VPC only, one port per rule."
  }
}
