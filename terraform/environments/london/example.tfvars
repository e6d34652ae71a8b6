# Example values for London. Every ID below is a placeholder: replace them with your own.
name = "relayd-ldn"

vpc = {
  id              = "vpc-0a1b2c3d4e5f60718"
  cidr_block      = "10.60.0.0/16"
  subnet_ids      = ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002", "subnet-0a1b2c3d4e5f60003"]
  route_table_ids = ["rtb-0a1b2c3d4e5f60001", "rtb-0a1b2c3d4e5f60002", "rtb-0a1b2c3d4e5f60003"]
}

data_centre = {
  cidrs              = ["10.20.0.0/16", "172.16.40.0/24"]
  transit_gateway_id = "tgw-0a1b2c3d4e5f60718"
  # Holds the data-centre routes (propagated from the Direct Connect gateway attachment).
  route_table_id = "tgw-rtb-0a1b2c3d4e5f60718"
  # Associated with the Direct Connect gateway attachment: gets the relay VPC CIDR.
  return_route_table_id = "tgw-rtb-0a1b2c3d4e5f60719"
  # The network team owns the Direct Connect gateway association; these are its allowed
  # prefixes, which must cover this VPC and Tokyo's (checked at plan).
  allowed_prefixes = ["10.60.0.0/15", "10.70.0.0/16"]
}

# Tokyo's relay VPC, reached from the data centre through this gateway and the peering.
remote_relay_cidrs = ["10.70.0.0/16"]

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
  ami_id = "ami-0a1b2c3d4e5f60718"
}

ecs_cluster_name     = "multicast"
consumer_account_ids = ["210987654321", "345678901234"]
alarm_emails         = ["relay-oncall@example.com"]

tags = {
  Project = "relayd"
  Owner   = "market-data"
}
