variable "name" {
  description = "Name prefix of this environment's relay resources."
  type        = string
  default     = "relayd-tyo"
}

variable "vpc" {
  description = "The existing relay VPC: ID, IPv4 CIDR, at least two private subnets in different zones, and the route tables of those subnets."
  type = object({
    id              = string
    cidr_block      = string
    subnet_ids      = list(string)
    route_table_ids = list(string)
  })
}

variable "data_centre_cidrs" {
  description = "CIDRs of the data-centre capture hosts; their TCP streams reach Tokyo through London over Transit Gateway peering."
  type        = list(string)
}

variable "london" {
  description = <<-EOT
    The London data-centre Transit Gateway to peer with, and its account (default: this one).
    route_table_id: its route table holding the data-centre routes, with which London's side
    of the peering is associated. return_route_table_id (default: route_table_id): the table
    the Direct Connect gateway attachment is associated with, which gets the static route to
    the Tokyo VPC CIDR over the peering. (London's environment lists `remote_relay_cidrs =
    [<Tokyo VPC CIDR>]` so the data centre learns it over Direct Connect.) accept_peering
    accepts the peering and does London's side from here (same account, provider aws.london);
    set it to false when London's owner does that (terraform output london_requirements).
  EOT
  type = object({
    transit_gateway_id    = string
    route_table_id        = string
    return_route_table_id = optional(string)
    account_id            = optional(string)
    accept_peering        = optional(bool, true)
  })

  validation {
    condition     = can(regex("^tgw-[0-9a-f]+$", var.london.transit_gateway_id)) && can(regex("^tgw-rtb-[0-9a-f]+$", var.london.route_table_id)) && (var.london.return_route_table_id == null || can(regex("^tgw-rtb-[0-9a-f]+$", coalesce(var.london.return_route_table_id, "x"))))
    error_message = "london.transit_gateway_id must be a Transit Gateway ID (tgw-...) and route_table_id a route table ID (tgw-rtb-...)."
  }

  validation {
    condition     = var.london.account_id == null || can(regex("^[0-9]{12}$", var.london.account_id))
    error_message = "london.account_id must be a 12-digit account ID."
  }
}

variable "transport_asn" {
  description = "Amazon side ASN of the Tokyo transport Transit Gateway (must differ from London's)."
  type        = number
  default     = 64513
}

variable "feeds" {
  description = "The feeds, keyed by name: the single source for listeners, target groups, security group rules and relayd.toml (see the relay module). auth_key_parameters: SSM SecureString parameters (names or ARNs) holding the feed's HELLO keys; two during a rotation."
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
}

variable "auth_key_kms_key_arns" {
  description = "Customer managed KMS keys that encrypt the auth_key_parameters; empty: the AWS managed key aws/ssm (see the relay module)."
  type        = list(string)
  default     = []
}

variable "instance" {
  description = "Relay instances: the relayd AMI (copied to this region) and the group size."
  type = object({
    ami_id           = string
    type             = optional(string, "c6in.large")
    fallback_types   = optional(list(string), ["c6i.large", "c5n.large"])
    min_size         = optional(number, 2)
    max_size         = optional(number, 4)
    desired_capacity = optional(number, 2)
  })
}

variable "mode" {
  description = "How the relay instances run relayd: \"host\" (relayd.service, the default) or \"ecs\" (an ECS service from the module's ECR repository); see the relay module."
  type        = string
  default     = "host"
}

variable "ecs" {
  description = "ECS mode settings passed to the relay module (image_tag is required when mode = \"ecs\")."
  type        = any
  default     = {}
}

variable "ecs_cluster_name" {
  description = "ECS cluster the relay instances join (ECS mode only; host mode creates none)."
  type        = string
  default     = "multicast"
}

variable "consumer_account_ids" {
  description = "Customer AWS accounts that receive the feeds (the RAM share principals)."
  type        = list(string)
}

variable "allow_external_principals" {
  description = "Whether consumers may be outside this AWS Organization (the exchange's customers usually are: on by default; each account then accepts the share's invitation)."
  type        = bool
  default     = true
}

variable "consumer_attachments" {
  description = "Consumer VPC attachments to accept (see the multicast-domain module)."
  type = map(object({
    account_id    = string
    attachment_id = string
    subnet_ids    = optional(list(string), [])
  }))
  default = {}
}

variable "alarm_emails" {
  description = "Addresses subscribed to the relay alarms (each must confirm by mail)."
  type        = list(string)
  default     = []
}

variable "quiet_feeds" {
  description = "Feeds that may legitimately carry nothing for minutes (e.g. dev): no silence alarm for them (the relay module's alarms.quiet_feeds)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags merged into every resource."
  type        = map(string)
  default     = {}
}
