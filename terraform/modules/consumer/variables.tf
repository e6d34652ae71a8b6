variable "name" {
  description = "Name prefix of the consumer's resources (attachment, security group)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,40}$", var.name))
    error_message = "name must be lower-case letters, digits and '-', starting with a letter."
  }
}

variable "relay" {
  description = <<-EOT
    What the relay owner's `terraform output customer` gives: the RAM share, the shared
    multicast Transit Gateway and its domain, the relay subnets' CIDRs (the only sources of
    the feeds' datagrams) and the feeds (groups and UDP ports).
  EOT
  type = object({
    ram_resource_share_arn = string
    transit_gateway_id     = string
    multicast_domain_id    = string
    relay_source_cidrs     = list(string)
    feeds = map(object({
      groups = list(string)
      ports  = list(string)
    }))
  })

  validation {
    condition     = can(regex("^tgw-[0-9a-f]+$", var.relay.transit_gateway_id)) && can(regex("^tgw-mcast-domain-[0-9a-f]+$", var.relay.multicast_domain_id)) && can(regex("^arn:aws[a-z-]*:ram:", var.relay.ram_resource_share_arn))
    error_message = "relay: transit_gateway_id (tgw-...), multicast_domain_id (tgw-mcast-domain-...) and ram_resource_share_arn (arn:aws:ram:...) as the relay owner's output gives them."
  }

  validation {
    condition     = length(var.relay.relay_source_cidrs) > 0 && alltrue([for c in var.relay.relay_source_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "relay.relay_source_cidrs must name the relay subnets (IPv4 CIDRs, not 0.0.0.0/0): the feeds' UDP is admitted from them only."
  }

  validation {
    condition = length(var.relay.feeds) > 0 && alltrue(flatten([for f in values(var.relay.feeds) : [for p in f.ports :
      can(regex("^[0-9]+(-[0-9]+)?$", p)) && try(tonumber(split("-", p)[0]) >= 1 && tonumber(split("-", p)[length(split("-", p)) - 1]) <= 65535, false)
    ]]))
    error_message = "relay.feeds must name at least one feed; ports are UDP ports (\"5000\") or ranges (\"5000-5099\") in 1..65535."
  }
}

variable "vpc" {
  description = "The customer's VPC and the subnets of the receiving instances (at most one per availability zone: the attachment's subnets, each associated with the multicast domain)."
  type = object({
    id         = string
    subnet_ids = list(string)
  })

  validation {
    condition     = length(var.vpc.subnet_ids) > 0 && length(distinct(var.vpc.subnet_ids)) == length(var.vpc.subnet_ids)
    error_message = "vpc.subnet_ids must name at least one subnet, each once."
  }
}

variable "accept_share" {
  description = "Accept the RAM share's invitation (an account outside the relay owner's organisation); false inside the organisation with RAM sharing enabled, where no invitation is sent."
  type        = bool
  default     = true
}

variable "attachment_accepted" {
  description = <<-EOT
    The relay owner accepts each customer attachment by ID (they do not accept shared
    attachments automatically). First apply with false: the attachment is created and
    `attachment_id` output; send it to the relay owner. Once they have accepted it, set true and
    apply again: the subnets are associated with the multicast domain.
  EOT
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags merged into every resource."
  type        = map(string)
  default     = {}
}
