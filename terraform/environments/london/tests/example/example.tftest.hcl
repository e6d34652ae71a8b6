# example.tfvars itself, planned and applied against the mocked provider. Run by the check script
# as `terraform test -test-directory=tests/example -var-file=example.tfvars`.

mock_provider "aws" {
  source = "../../tests/mocks/aws"
}

run "example_tfvars" {
  assert {
    condition     = tolist(module.relay.auth_key_files["prod"]) == tolist(["/etc/relayd/keys/prod-1.key"]) && strcontains(output.relayd_toml, "\nauth_key_files = [\"/etc/relayd/keys/prod-1.key\"]\n") && length(regexall("auth_key_files", output.relayd_toml)) == 1
    error_message = "The example authenticates prod with one key file and no other feed."
  }

  assert {
    condition     = length(output.auth_key_parameters) == 1 && endswith(output.auth_key_parameters[0], ":parameter/relayd/prod/key-1") && startswith(output.auth_key_parameters[0], "arn:aws:ssm:")
    error_message = "The relays read exactly the example's key parameter."
  }

  assert {
    condition     = length(output.capture_targets) == length(var.feeds) && length(regexall("\\[\\[emit\\]\\]", output.relayd_toml)) == length(var.feeds)
    error_message = "Every feed of example.tfvars gets a capture target and an [[emit]] table."
  }

  assert {
    condition     = output.customer.igmp_version == 2 && length(module.multicast_domain.consumer_account_ids) == length(var.consumer_account_ids)
    error_message = "The example shares the domain with its consumers."
  }
}

run "example_routing" {
  command = plan

  assert {
    condition     = length(aws_ec2_transit_gateway_route_table_association.relay) == 1 && length(aws_ec2_transit_gateway_route_table_propagation.relay) == 1 && toset(output.data_centre_requirements.dx_allowed_prefixes) == toset(concat([var.vpc.cidr_block], var.remote_relay_cidrs))
    error_message = "The example associates and propagates the relay attachment explicitly and names the prefixes the data centre must learn."
  }
}
