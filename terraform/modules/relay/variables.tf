variable "name" {
  description = "Name prefix for every resource of this relay (load balancer, group, roles, alarms)."
  type        = string

  validation {
    # The NLB and target group names derived from it must stay within 32 characters.
    condition     = can(regex("^[a-z][a-z0-9-]{0,17}$", var.name))
    error_message = "name must be 1-18 characters of lower-case letters, digits and '-', starting with a letter."
  }
}

variable "vpc" {
  description = "The relay VPC: its ID, its IPv4 CIDR (health checks come from it) and at least two subnets in different zones for the load balancer and the instances."
  type = object({
    id         = string
    cidr_block = string
    subnet_ids = list(string)
  })

  validation {
    condition     = can(cidrhost(var.vpc.cidr_block, 0)) && cidrhost(var.vpc.cidr_block, 0) == split("/", var.vpc.cidr_block)[0]
    error_message = "vpc.cidr_block must be an IPv4 CIDR without host bits set."
  }

  validation {
    condition     = length(distinct(var.vpc.subnet_ids)) >= 2
    error_message = "vpc.subnet_ids must name at least two distinct subnets (one per availability zone) so the relay survives the loss of a zone."
  }
}

variable "feeds" {
  description = <<-EOT
    The feeds this relay emits, keyed by feed name. This map is the single source for the NLB
    listeners, the target groups and their health checks, the security group rules, the alarms
    and the rendered relayd.toml. `groups` are the multicast CIDRs the feed may emit
    (allowed_groups), `ports` the UDP ports (numbers or "lo-hi" ranges).
    `auth_key_parameters` turns HELLO authentication on for the feed: SSM SecureString
    parameters (names such as "/relayd/prod/key-1", or parameter ARNs) each holding one key; the
    instances fetch them at boot into /etc/relayd/keys/<feed>-<n>.key and relayd accepts any of
    them (auth_key_files), so a rotation lists the old and the new key for a while.
    `watch_groups` ("group:port" inside the feed's groups and ports), `arbitration` ("none",
    "deribit", "content"), `deribit_layout` ("frame-v1", "sbe") and `emitter_grace` (a relayd
    duration such as "1s") render as the emit feed's keys of the same names: one active
    emitter per feed and A/B capture hosts (docs/DEPLOYMENT.md). Every instance of the group
    must watch the feed's groups, or a standby that never emitted it cannot see the active one.
  EOT
  type = map(object({
    port                = number
    groups              = list(string)
    ports               = optional(list(string), ["1-65535"])
    ttl                 = optional(number, 16)
    max_connections     = optional(number, 4)
    auth_key_parameters = optional(list(string), [])
    watch_groups        = optional(list(string), [])
    arbitration         = optional(string, "none")
    deribit_layout      = optional(string, "frame-v1")
    emitter_grace       = optional(string)
  }))

  validation {
    condition     = length(var.feeds) > 0
    error_message = "feeds must name at least one feed."
  }

  validation {
    condition     = alltrue([for name in keys(var.feeds) : can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", name))])
    error_message = "Feed names must match [a-z0-9][a-z0-9_-]{0,62} (the relayd feed name rule)."
  }

  validation {
    condition     = alltrue([for f in values(var.feeds) : f.port == floor(f.port) && f.port >= 1 && f.port <= 65535])
    error_message = "Every feed port must be an integer in 1..65535."
  }

  validation {
    condition     = length(distinct([for f in values(var.feeds) : f.port])) == length(var.feeds) && !contains([for f in values(var.feeds) : f.port], var.health_port)
    error_message = "Feed ports must be unique and must differ from health_port: relayd refuses two listeners on one port."
  }

  validation {
    condition     = alltrue([for f in values(var.feeds) : length(f.groups) > 0])
    error_message = "Every feed must allow at least one multicast group."
  }

  validation {
    # Inside 224.0.0.0/4, outside the link-local 224.0.0.0/24, no host bits set.
    condition = alltrue(flatten([for f in values(var.feeds) : [for g in f.groups :
      can(cidrhost(g, 0)) &&
      try(cidrhost(g, 0) == split("/", g)[0], false) &&
      try(tonumber(split(".", g)[0]) >= 224 && tonumber(split(".", g)[0]) <= 239, false) &&
      try(tonumber(split("/", g)[1]) >= 4, false) &&
      !startswith(g, "224.0.0.")
    ]]))
    error_message = "Every feed group must be a CIDR inside 224.0.0.0/4 and outside 224.0.0.0/24, without host bits set (e.g. \"239.10.1.0/24\")."
  }

  validation {
    condition = alltrue(flatten([for f in values(var.feeds) : [for p in f.ports :
      can(regex("^[0-9]+(-[0-9]+)?$", p)) &&
      try(tonumber(split("-", p)[0]) >= 1 && tonumber(split("-", p)[length(split("-", p)) - 1]) <= 65535 && tonumber(split("-", p)[0]) <= tonumber(split("-", p)[length(split("-", p)) - 1]), false)
    ]]))
    error_message = "Feed ports lists take UDP ports (\"5000\") or ranges (\"5000-5099\") within 1..65535 with lo <= hi."
  }

  validation {
    condition     = alltrue([for f in values(var.feeds) : f.ttl == floor(f.ttl) && f.ttl >= 1 && f.ttl <= 255 && f.max_connections == floor(f.max_connections) && f.max_connections >= 1])
    error_message = "ttl must be an integer in 1..255 and max_connections an integer of at least 1."
  }

  validation {
    # A parameter name as SSM takes it (letters, digits, '_', '.', '-', and '/' between the levels
    # of a hierarchy, which then starts with '/'; at most 15 levels; no reserved "aws"/"ssm"
    # prefix), or the ARN of one. No wildcards: each entry becomes one exact IAM resource.
    condition = alltrue(flatten([for f in values(var.feeds) : [for p in f.auth_key_parameters :
      (
        can(regex("^(/[A-Za-z0-9_.-]+){1,15}$|^[A-Za-z0-9_.-]+$", p)) ||
        can(regex("^arn:aws[a-z-]*:ssm:[a-z]{2}(-[a-z]+)+-[0-9]:[0-9]{12}:parameter/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,14}$", p))
      ) &&
      length(p) <= 1011 &&
      !can(regex("^(?i)/?(aws|ssm)", startswith(p, "arn:") ? try(split(":parameter/", p)[1], "") : p))
    ]]))
    error_message = "auth_key_parameters takes SSM parameter names (\"/relayd/prod/key-1\": letters, digits, '_', '.', '-', levels separated by '/' and starting with '/', not starting with \"aws\" or \"ssm\") or parameter ARNs (arn:aws:ssm:<region>:<account>:parameter/...), without wildcards."
  }

  validation {
    # "a.b.c.d:port", a multicast address outside 224.0.0.0/24; relayd check-config checks the rest.
    condition = alltrue(flatten([for f in values(var.feeds) : [for w in f.watch_groups :
      can(regex("^(22[4-9]|23[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}:[0-9]{1,5}$", w)) &&
      !startswith(w, "224.0.0.") &&
      try(tonumber(split(":", w)[1]) >= 1 && tonumber(split(":", w)[1]) <= 65535, false)
    ]]))
    error_message = "watch_groups takes \"group:port\" entries with a multicast group outside 224.0.0.0/24 and a port in 1..65535 (e.g. \"239.10.1.1:6100\")."
  }

  validation {
    # relayd sends its beacons to the feed's listen port on the first watch group.
    condition     = alltrue(flatten([for f in values(var.feeds) : [for w in f.watch_groups : try(tonumber(split(":", w)[1]) != f.port, true)]]))
    error_message = "A feed's watch_groups must not use the feed's own port: relayd's beacons go to that port on the first watch group, where customers must not bind."
  }

  validation {
    condition     = alltrue([for f in values(var.feeds) : length(distinct(f.watch_groups)) == length(f.watch_groups)])
    error_message = "A feed's watch_groups must not name one group:port twice."
  }

  validation {
    condition     = alltrue([for f in values(var.feeds) : contains(["none", "deribit", "content"], f.arbitration) && contains(["frame-v1", "sbe"], f.deribit_layout)])
    error_message = "arbitration must be \"none\", \"deribit\" or \"content\", and deribit_layout \"frame-v1\" or \"sbe\"."
  }

  validation {
    condition     = alltrue([for f in values(var.feeds) : f.emitter_grace == null || can(regex("^([0-9]+(\\.[0-9]+)?(us|ms|s|m|h))+$", coalesce(f.emitter_grace, "x")))])
    error_message = "emitter_grace is a relayd duration such as \"1s\", \"1500ms\" or \"1m30s\"."
  }

  validation {
    condition     = alltrue([for f in values(var.feeds) : length(distinct(f.auth_key_parameters)) == length(f.auth_key_parameters)])
    error_message = "A feed's auth_key_parameters must not name one parameter twice."
  }
}

variable "auth_key_kms_key_arns" {
  description = <<-EOT
    Customer managed KMS keys that encrypt the feeds' auth_key_parameters. Empty (the default):
    the parameters use the AWS managed key aws/ssm, whose own key policy already lets every
    principal of the account decrypt through SSM, so the role gets no KMS statement. Named
    keys: the role may kms:Decrypt with them only through SSM (kms:ViaService) and only for
    these parameters (kms:EncryptionContext:PARAMETER_ARN); each key's policy must admit the
    account (or the role).
  EOT
  type        = list(string)
  default     = []

  validation {
    # Key ARNs, not alias ARNs: IAM matches kms:Decrypt against the key's ARN.
    condition     = alltrue([for k in var.auth_key_kms_key_arns : can(regex("^arn:aws[a-z-]*:kms:[a-z]{2}(-[a-z]+)+-[0-9]:[0-9]{12}:key/(mrk-[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$", k))])
    error_message = "auth_key_kms_key_arns takes KMS key ARNs (arn:aws:kms:<region>:<account>:key/<key id>), not aliases."
  }
}

variable "restrict_parameter_reads" {
  description = <<-EOT
    Deny the instance role every SSM parameter read except the feeds' auth_key_parameters and
    the CloudWatch agent's AmazonCloudWatch-* parameters. AmazonSSMManagedInstanceCore alone
    allows ssm:GetParameter(s) on every parameter of the account, and the aws/ssm key decrypts
    for every principal of the account. Turn it off only if Run Command or State Manager
    documents on these instances resolve other parameters.
  EOT
  type        = bool
  default     = true
}

variable "data_centre_cidrs" {
  description = "IPv4 CIDRs of the data-centre capture hosts: the only sources allowed on the feed ports (security groups and relayd's allowed_sources)."
  type        = list(string)

  validation {
    condition     = length(var.data_centre_cidrs) > 0
    error_message = "data_centre_cidrs must name at least one CIDR."
  }

  validation {
    condition = alltrue([for c in var.data_centre_cidrs :
      can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+/[0-9]+$", c)) && can(cidrhost(c, 0)) && try(cidrhost(c, 0) == split("/", c)[0], false)
    ])
    error_message = "data_centre_cidrs must be IPv4 CIDRs without host bits set (e.g. \"10.20.0.0/16\")."
  }

  validation {
    condition     = !contains(var.data_centre_cidrs, "0.0.0.0/0")
    error_message = "data_centre_cidrs must name the data centre, not 0.0.0.0/0: the feed ports are open only to it."
  }
}

variable "health_port" {
  description = "Port of relayd's HTTP health server (/healthz/<feed>), used by the NLB health checks."
  type        = number
  default     = 8080

  validation {
    condition     = var.health_port == floor(var.health_port) && var.health_port >= 1 && var.health_port <= 65535
    error_message = "health_port must be an integer in 1..65535."
  }
}

variable "multicast_interface" {
  description = "Egress interface relayd sends the multicast on. Amazon Linux 2023 names the primary ENA interface of Nitro instances ens5 (predictable names), not eth0."
  type        = string
  default     = "ens5"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.:-]{1,15}$", var.multicast_interface))
    error_message = "multicast_interface must be a Linux interface name (at most 15 characters) or an IPv4 address."
  }
}

variable "log_level" {
  description = "relayd [process] log_level."
  type        = string
  default     = "info"

  validation {
    condition     = contains(["debug", "info", "warning", "error"], var.log_level)
    error_message = "log_level must be one of debug, info, warning, error."
  }
}

variable "instance" {
  description = <<-EOT
    The relay instances: the relayd AMI, type, root volume and the Auto Scaling group size.
    fallback_types are launched, in order, when `type` has no capacity (all must be Nitro types,
    which multicast on Transit Gateway needs). ebs_kms_key_arn: a customer managed key needs a
    key policy (or grant) for the Auto Scaling service-linked role, see the module README.
  EOT
  type = object({
    ami_id           = string
    type             = optional(string, "c6in.large")
    fallback_types   = optional(list(string), ["c6i.large", "c5n.large"])
    root_volume_size = optional(number, 30)
    ebs_kms_key_arn  = optional(string)
    min_size         = optional(number, 2)
    max_size         = optional(number, 4)
    desired_capacity = optional(number, 2)
  })

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.instance.ami_id))
    error_message = "instance.ami_id must be an AMI ID (ami-...)."
  }

  validation {
    condition     = var.instance.min_size >= 1 && var.instance.min_size <= var.instance.desired_capacity && var.instance.desired_capacity <= var.instance.max_size
    error_message = "The group size must satisfy 1 <= min_size <= desired_capacity <= max_size."
  }

  validation {
    condition     = alltrue([for t in concat([var.instance.type], var.instance.fallback_types) : can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", t))])
    error_message = "instance.type and instance.fallback_types must be EC2 instance types (e.g. \"c6in.large\")."
  }
}

variable "ecs_cluster_name" {
  description = "ECS cluster the instances' agent joins (written to /etc/ecs/ecs.config by user data)."
  type        = string
  default     = "multicast"

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{1,255}$", var.ecs_cluster_name))
    error_message = "ecs_cluster_name must be 1-255 letters, digits, '-' or '_'."
  }
}

variable "attach_ecs_instance_policy" {
  description = "Attach AmazonEC2ContainerServiceforEC2Role so the ECS agent can register. Off by default: the role then carries only the CloudWatch agent and SSM."
  type        = bool
  default     = false
}

variable "https_egress_cidrs" {
  description = "Where the instances may open HTTPS (SSM, CloudWatch, ECS endpoints). Narrow it to the VPC CIDR when the VPC has interface endpoints."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = alltrue([for c in var.https_egress_cidrs : can(cidrhost(c, 0))])
    error_message = "https_egress_cidrs must be IPv4 CIDRs."
  }
}

variable "deletion_protection" {
  description = "Deletion protection of the NLB; turn it off (and apply) before destroying the relay."
  type        = bool
  default     = true
}

variable "access_logs" {
  description = "Optional NLB access logs to an existing S3 bucket whose policy admits the log delivery service (an NLB logs TLS listeners only)."
  type = object({
    bucket = string
    prefix = optional(string, "relay-nlb")
  })
  default = null
}

variable "log_retention_days" {
  description = "Retention of the relay log group, in days."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, ...)."
  }
}

variable "alarms" {
  description = <<-EOT
    CloudWatch alarms, per feed, on relayd's own metrics (see cloudwatch.tf) and the NLB. An SNS
    topic is created unless sns_topic_arn names one (its key policy must then let CloudWatch
    publish). silent_minutes: the feed's datagrams out, summed over every instance, at zero
    this long (quiet_feeds get no such alarm, e.g. a dev feed that is idle at times).
    max_ack_lag / ack_lag_minutes: datagrams emitted but not acknowledged. redundancy_minutes:
    fewer healthy hosts than the desired capacity this long. role_and_upstream_alarms (on by
    default): alarm on the active-emitter role gauge (no-active-emitter reads it, split-brain)
    and on upstream gaps; off, no-active-emitter reads the capture connections instead (for a
    relayd older than these metrics).
  EOT
  type = object({
    sns_topic_arn            = optional(string)
    email_endpoints          = optional(list(string), [])
    silent_minutes           = optional(number, 5)
    quiet_feeds              = optional(list(string), [])
    max_ack_lag              = optional(number, 100000)
    ack_lag_minutes          = optional(number, 3)
    redundancy_minutes       = optional(number, 5)
    role_and_upstream_alarms = optional(bool, true)
  })
  default = {}

  validation {
    condition     = var.alarms.sns_topic_arn == null || can(regex("^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]+$", var.alarms.sns_topic_arn))
    error_message = "alarms.sns_topic_arn must be an SNS topic ARN."
  }

  validation {
    condition     = alltrue([for n in [var.alarms.silent_minutes, var.alarms.ack_lag_minutes, var.alarms.redundancy_minutes] : n == floor(n) && n >= 1 && n <= 60]) && var.alarms.max_ack_lag > 0
    error_message = "alarms: silent_minutes, ack_lag_minutes and redundancy_minutes must be whole minutes in 1..60, max_ack_lag positive."
  }

  validation {
    condition     = alltrue([for f in var.alarms.quiet_feeds : contains(keys(var.feeds), f)])
    error_message = "alarms.quiet_feeds must name feeds of this relay."
  }
}

variable "tags" {
  description = "Tags merged into every resource."
  type        = map(string)
  default     = {}
}

variable "mode" {
  description = <<-EOT
    How the relay instances run relayd. "host" (the default): relayd.service on each instance,
    instance targets, the ECS agent off. "ecs": an ECS service on this Auto Scaling group
    (capacity provider), one awsvpc task per instance from the ECR image, ip targets with the
    client address preserved; the instances' ECS agent joins the cluster. See ecs.tf.
  EOT
  type        = string
  default     = "host"

  validation {
    condition     = contains(["host", "ecs"], var.mode)
    error_message = "mode must be \"host\" (relayd.service on the instances) or \"ecs\" (an ECS service on them)."
  }
}

variable "ecs" {
  description = <<-EOT
    ECS mode settings (used when mode = "ecs"). image_tag: the tag of the relayd image in the
    module's ECR repository (required in ECS mode; tags are immutable). desired_count: tasks,
    one per instance (default instance.desired_capacity). cpu (units) and memory (MiB): the
    container's share of the instance. stop_timeout: seconds between SIGTERM and SIGKILL.
    multicast_interface: the task ENI's name inside the task (awsvpc: eth0). keep_images and
    untagged_image_days: the ECR lifecycle policy. alarm_utilization_percent: CPU and memory
    alarm threshold.
  EOT
  type = object({
    image_tag                 = optional(string, "")
    desired_count             = optional(number)
    cpu                       = optional(number, 1024)
    memory                    = optional(number, 2048)
    stop_timeout              = optional(number, 30)
    multicast_interface       = optional(string, "eth0")
    keep_images               = optional(number, 30)
    untagged_image_days       = optional(number, 7)
    alarm_utilization_percent = optional(number, 80)
  })
  default = {}

  validation {
    condition     = var.mode != "ecs" || can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.ecs.image_tag))
    error_message = "mode = \"ecs\" needs ecs.image_tag: the tag of the relayd image pushed to the module's ECR repository."
  }

  validation {
    condition     = var.ecs.stop_timeout >= 10 && var.ecs.stop_timeout <= 120 && var.ecs.cpu >= 128 && var.ecs.memory >= 256
    error_message = "ecs.stop_timeout must be 10..120 s (relayd needs up to 5 s to stop), cpu at least 128 units and memory at least 256 MiB."
  }

  validation {
    condition     = var.ecs.desired_count == null || try(var.ecs.desired_count >= 1, false)
    error_message = "ecs.desired_count must be at least 1."
  }

  validation {
    condition     = can(regex("^[A-Za-z0-9_.:-]{1,15}$", var.ecs.multicast_interface)) && var.ecs.keep_images >= 1 && var.ecs.untagged_image_days >= 1 && var.ecs.alarm_utilization_percent > 0 && var.ecs.alarm_utilization_percent <= 100
    error_message = "ecs.multicast_interface must be an interface name; keep_images and untagged_image_days at least 1; alarm_utilization_percent in 1..100."
  }
}
