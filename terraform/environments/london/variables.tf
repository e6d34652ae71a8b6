variable "name" {
  description = "Name prefix of this environment's relay resources."
  type        = string
  default     = "relayd-ldn"
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

variable "data_centre" {
  description = <<-EOT
    The data centre: the CIDRs of its capture hosts, and the Transit Gateway that carries their
    TCP streams from Direct Connect. route_table_id: the gateway's route table that holds the
    routes to the data-centre CIDRs (propagated from the Direct Connect gateway attachment); the
    relay attachment is associated with it (and so is Tokyo's peering, from the Tokyo
    environment). return_route_table_id (default: route_table_id): the route table the Direct
    Connect gateway attachment is associated with; the relay attachment propagates the relay
    VPC CIDR into it. direct_connect_gateway_id: manage the Direct Connect gateway's
    association with the Transit Gateway here, with allowed prefixes = the relay CIDRs; leave
    it null when the network team owns that association and give its current allowed_prefixes
    instead, which must cover every relay CIDR (checked at plan). attach_relay_vpc: attach the
    relay VPC to the gateway here.
  EOT
  type = object({
    cidrs                     = list(string)
    transit_gateway_id        = string
    route_table_id            = string
    return_route_table_id     = optional(string)
    direct_connect_gateway_id = optional(string)
    allowed_prefixes          = optional(list(string))
    attach_relay_vpc          = optional(bool, true)
  })

  validation {
    condition     = can(regex("^tgw-[0-9a-f]+$", var.data_centre.transit_gateway_id))
    error_message = "data_centre.transit_gateway_id must be a Transit Gateway ID (tgw-...)."
  }

  validation {
    condition     = can(regex("^tgw-rtb-[0-9a-f]+$", var.data_centre.route_table_id)) && (var.data_centre.return_route_table_id == null || can(regex("^tgw-rtb-[0-9a-f]+$", coalesce(var.data_centre.return_route_table_id, "x"))))
    error_message = "data_centre.route_table_id and return_route_table_id must be Transit Gateway route table IDs (tgw-rtb-...)."
  }

  validation {
    condition     = (var.data_centre.direct_connect_gateway_id == null) != (var.data_centre.allowed_prefixes == null)
    error_message = "Give either data_centre.direct_connect_gateway_id (this environment manages the association's allowed prefixes) or data_centre.allowed_prefixes (the prefixes the network team's association allows), not both and not neither: otherwise nobody checks that the data centre learns the relay CIDRs."
  }

  validation {
    # Each relay CIDR must lie inside an allowed prefix, or the data centre never learns a route to it.
    condition = var.data_centre.allowed_prefixes == null || alltrue([for c in concat([var.vpc.cidr_block], var.remote_relay_cidrs) : anytrue([for p in coalesce(var.data_centre.allowed_prefixes, []) :
      tonumber(split("/", p)[1]) <= tonumber(split("/", c)[1]) && cidrhost(p, 0) == cidrhost("${split("/", c)[0]}/${split("/", p)[1]}", 0)
    ])])
    error_message = "data_centre.allowed_prefixes (the Direct Connect gateway association's) must cover the relay VPC CIDR and every remote_relay_cidrs entry: the data centre learns only these prefixes. Ask the network team to add the missing ones (terraform output data_centre_requirements)."
  }
}

variable "remote_relay_cidrs" {
  description = "Relay VPC CIDRs reached from the data centre through this Transit Gateway over peering (Tokyo's VPC CIDR): they must be advertised over Direct Connect too."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.remote_relay_cidrs : can(cidrhost(c, 0))])
    error_message = "remote_relay_cidrs must be IPv4 CIDRs."
  }
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
