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
    condition     = aws_autoscaling_group.this.health_check_type == "ELB" && aws_autoscaling_group.this.instance_refresh[0].strategy == "Rolling"
    error_message = "The group must use ELB health checks and rolling instance refresh."
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
    condition     = toset([for a in aws_cloudwatch_metric_alarm.traffic : a.metric_name]) == toset(["NetworkIn", "NetworkOut"]) && alltrue([for a in aws_cloudwatch_metric_alarm.traffic : a.statistic == "Minimum" && a.comparison_operator == "LessThanThreshold" && a.treat_missing_data == "breaching"])
    error_message = "Traffic in and out must alarm when the quietest instance goes below the threshold or silent."
  }

  assert {
    condition     = alltrue([for a in concat(values(aws_cloudwatch_metric_alarm.traffic), values(aws_cloudwatch_metric_alarm.healthy_hosts)) : a.alarm_actions == toset([aws_sns_topic.alarms[0].arn])])
    error_message = "Every alarm must notify the module's SNS topic."
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
    condition     = aws_iam_role_policy.parameters[0].role == aws_iam_role.instance.id && contains(aws_autoscaling_group.this.launch_template[*].id, aws_launch_template.this.id)
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
