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
    The data centre: the CIDRs of its capture hosts, and the Transit Gateway that carries
    their TCP streams from Direct Connect (attach_relay_vpc: attach the relay VPC to it here).
  EOT
  type = object({
    cidrs              = list(string)
    transit_gateway_id = string
    attach_relay_vpc   = optional(bool, true)
  })

  validation {
    condition     = can(regex("^tgw-[0-9a-f]+$", var.data_centre.transit_gateway_id))
    error_message = "data_centre.transit_gateway_id must be a Transit Gateway ID (tgw-...)."
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
    min_size         = optional(number, 2)
    max_size         = optional(number, 4)
    desired_capacity = optional(number, 2)
  })
}

variable "ecs_cluster_name" {
  description = "ECS cluster the relay instances join."
  type        = string
  default     = "multicast"
}

variable "consumer_account_ids" {
  description = "Customer AWS accounts that receive the feeds (the RAM share principals)."
  type        = list(string)
}

variable "allow_external_principals" {
  description = "Whether consumers may be outside this AWS Organization."
  type        = bool
  default     = false
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

variable "tags" {
  description = "Tags merged into every resource."
  type        = map(string)
  default     = {}
}
