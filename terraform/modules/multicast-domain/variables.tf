variable "name" {
  description = "Name of the multicast Transit Gateway, its domain and the RAM share."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,62}$", var.name))
    error_message = "name must be lower-case letters, digits and '-', starting with a letter."
  }
}

variable "transit_gateway" {
  description = "The multicast Transit Gateway's description and Amazon side ASN."
  type = object({
    description     = optional(string, "relayd multicast to customer VPCs")
    amazon_side_asn = optional(number, 64512)
  })
  default = {}

  validation {
    condition     = (var.transit_gateway.amazon_side_asn >= 64512 && var.transit_gateway.amazon_side_asn <= 65534) || (var.transit_gateway.amazon_side_asn >= 4200000000 && var.transit_gateway.amazon_side_asn <= 4294967294)
    error_message = "transit_gateway.amazon_side_asn must be a private ASN (64512-65534 or 4200000000-4294967294)."
  }
}

variable "multicast_domain" {
  description = <<-EOT
    Multicast domain options. IGMPv2 is always on and static sources always off (AWS allows
    only one of the two). auto_accept_shared_associations lets an accepted consumer
    attachment associate its own subnets with the domain without another approval.
  EOT
  type = object({
    auto_accept_shared_associations = optional(string, "enable")
  })
  default = {}

  validation {
    condition     = contains(["enable", "disable"], var.multicast_domain.auto_accept_shared_associations)
    error_message = "multicast_domain.auto_accept_shared_associations must be \"enable\" or \"disable\"."
  }
}

variable "relay_vpc" {
  description = "The relay VPC: its ID and the subnets (one per zone, those of the relay instances) to attach and associate with the domain."
  type = object({
    id         = string
    subnet_ids = list(string)
  })

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.relay_vpc.id))
    error_message = "relay_vpc.id must be a VPC ID (vpc-...)."
  }

  validation {
    condition     = length(distinct(var.relay_vpc.subnet_ids)) >= 2 && alltrue([for s in var.relay_vpc.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "relay_vpc.subnet_ids must name at least two distinct subnets (subnet-...)."
  }
}

variable "consumer_account_ids" {
  description = "AWS account IDs that receive the feeds: exactly the principals of the RAM share."
  type        = list(string)

  validation {
    condition     = alltrue([for a in var.consumer_account_ids : can(regex("^[0-9]{12}$", a))])
    error_message = "consumer_account_ids must be 12-digit AWS account IDs."
  }

  validation {
    condition     = length(distinct(var.consumer_account_ids)) == length(var.consumer_account_ids)
    error_message = "consumer_account_ids must not repeat an account."
  }
}

variable "allow_external_principals" {
  description = "Whether the RAM share may reach accounts outside this AWS Organization. On by default: the exchange's customers are other companies' accounts (each gets an invitation to accept). Principals stay exactly consumer_account_ids either way; turn it off when every consumer is inside the organisation."
  type        = bool
  default     = true
}

variable "share_multicast_domain" {
  description = "Also share the multicast domain, so consumers associate their own subnets with it."
  type        = bool
  default     = true
}

variable "consumer_attachments" {
  description = <<-EOT
    VPC attachments consumers created to the shared Transit Gateway, keyed by a label: the
    attachment ID, the owning account (must be a consumer) and, when the domain is not shared,
    the subnets to associate with the domain here. Empty until consumers have attached.
  EOT
  type = map(object({
    account_id    = string
    attachment_id = string
    subnet_ids    = optional(list(string), [])
  }))
  default = {}

  validation {
    condition     = alltrue([for a in values(var.consumer_attachments) : can(regex("^tgw-attach-[0-9a-f]+$", a.attachment_id))])
    error_message = "consumer_attachments attachment_id must be a Transit Gateway attachment ID (tgw-attach-...)."
  }

  validation {
    condition     = alltrue([for a in values(var.consumer_attachments) : contains(var.consumer_account_ids, a.account_id)])
    error_message = "Every consumer attachment must belong to an account in consumer_account_ids."
  }
}

variable "tags" {
  description = "Tags merged into every resource."
  type        = map(string)
  default     = {}
}
