# Egress without a NAT gateway: interface endpoints (with private DNS) for what the instances
# call over HTTPS: SSM and its message channels (Session Manager, Run Command, the key
# parameters), CloudWatch Logs and metrics (the agent), KMS and STS. On by default; turn it
# off when the VPC already has these endpoints (private DNS allows one per service and VPC) or
# routes to the AWS APIs another way. The VPC needs DNS support and DNS hostnames enabled.

variable "vpc_endpoints" {
  description = <<-EOT
    Interface VPC endpoints for the AWS services the relays call. enabled (default true) creates
    one endpoint per service in `services`, with private DNS, in the relay subnets (or
    `subnet_ids`), behind a security group that admits HTTPS from the relay instances only.
    Turn it off when the VPC already has endpoints for these services (private DNS allows one
    per service and VPC), or has a NAT gateway or proxy.
  EOT
  type = object({
    enabled    = optional(bool, true)
    services   = optional(list(string), ["ssm", "ssmmessages", "ec2messages", "logs", "monitoring", "kms", "sts"])
    subnet_ids = optional(list(string))
  })
  default = {}

  validation {
    condition     = alltrue([for s in var.vpc_endpoints.services : can(regex("^[a-z0-9.-]+$", s))]) && length(distinct(var.vpc_endpoints.services)) == length(var.vpc_endpoints.services)
    error_message = "vpc_endpoints.services takes service names as in com.amazonaws.<region>.<service> (e.g. \"ssm\"), each once."
  }
}

locals {
  endpoint_services = var.vpc_endpoints.enabled ? toset(var.vpc_endpoints.services) : toset([])
}

resource "aws_security_group" "endpoints" {
  count = var.vpc_endpoints.enabled ? 1 : 0

  name_prefix = "${var.name}-endpoints-"
  description = "relayd ${var.name} interface endpoints: HTTPS from the relay instances"
  vpc_id      = var.vpc.id
  tags        = merge(local.tags, { Name = "${var.name}-endpoints" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_https" {
  count = var.vpc_endpoints.enabled ? 1 : 0

  security_group_id            = aws_security_group.endpoints[0].id
  description                  = "HTTPS from the relay instances"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.instance.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "instance_endpoints" {
  count = var.vpc_endpoints.enabled ? 1 : 0

  security_group_id            = aws_security_group.instance.id
  description                  = "HTTPS to the interface endpoints"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.endpoints[0].id
  tags                         = local.tags
}

resource "aws_vpc_endpoint" "interface" {
  for_each = local.endpoint_services

  vpc_id              = var.vpc.id
  service_name        = "com.amazonaws.${local.region}.${each.value}"
  vpc_endpoint_type   = "Interface"
  private_dns_enabled = true
  subnet_ids          = coalesce(var.vpc_endpoints.subnet_ids, var.vpc.subnet_ids)
  security_group_ids  = [aws_security_group.endpoints[0].id]
  tags                = merge(local.tags, { Name = "${var.name}-${each.value}" })
}

output "vpc_endpoints" {
  description = "The interface endpoints created, by service (empty when vpc_endpoints.enabled is false)."
  value       = { for s, e in aws_vpc_endpoint.interface : s => e.id }
}
