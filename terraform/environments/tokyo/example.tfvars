# Example values for Tokyo. Every ID below is a placeholder: replace them with your own.
name = "relayd-tyo"

vpc = {
  id              = "vpc-0f1e2d3c4b5a69788"
  cidr_block      = "10.70.0.0/16"
  subnet_ids      = ["subnet-0f1e2d3c4b5a60001", "subnet-0f1e2d3c4b5a60002", "subnet-0f1e2d3c4b5a60003"]
  route_table_ids = ["rtb-0f1e2d3c4b5a60001", "rtb-0f1e2d3c4b5a60002", "rtb-0f1e2d3c4b5a60003"]
}

data_centre_cidrs = ["10.20.0.0/16", "172.16.40.0/24"]

london = {
  transit_gateway_id    = "tgw-0a1b2c3d4e5f60718"
  route_table_id        = "tgw-rtb-0a1b2c3d4e5f60718" # the data-centre routes
  return_route_table_id = "tgw-rtb-0a1b2c3d4e5f60719" # the Direct Connect attachment's
}

feeds = {
  dev = { port = 6666, groups = ["239.192.10.0/24"] }
  # prod authenticates its HELLO with the key in this SecureString parameter (created in this
  # region beforehand; see terraform/README.md). During a rotation: ["/relayd/prod/key-1",
  # "/relayd/prod/key-2"].
  prod = {
    port                = 6667
    groups              = ["239.192.20.0/24", "239.192.21.0/24"]
    ports               = ["30000-30999"]
    auth_key_parameters = ["/relayd/prod/key-1"]
    # One active emitter per feed: every instance watches a few groups that always carry
    # traffic; two capture hosts (A and B lines) are merged by the exchange's sequence numbers
    # (docs/DEPLOYMENT.md).
    watch_groups = ["239.192.20.1:30001", "239.192.21.1:30002"]
    arbitration  = "deribit"
  }
}

instance = {
  ami_id = "ami-0f1e2d3c4b5a69788"
}

ecs_cluster_name     = "multicast"
consumer_account_ids = ["210987654321", "456789012345"]
alarm_emails         = ["relay-oncall@example.com"]

tags = {
  Project = "relayd"
  Owner   = "market-data"
}
