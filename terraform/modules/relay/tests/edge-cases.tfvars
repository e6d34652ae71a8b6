# Inputs at the edges of the rules, rendered by the check script and fed to `relayd check-config`.
name = "relay-edge"

vpc = {
  id         = "vpc-0123456789abcdef0"
  cidr_block = "10.50.0.0/16"
  subnet_ids = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb", "subnet-0cccccccccccccccc"]
}

feeds = {
  "0_a" = { port = 1, groups = ["224.0.1.0/24"], ports = ["1"], auth_key_parameters = ["relayd.edge_key-1"] }
  "eq-test" = {
    port         = 65535, groups = ["239.255.255.255/32", "232.0.0.0/8"], ports = ["5000-5000", "65535", "1-1024"], ttl = 255, max_connections = 1
    watch_groups = ["239.255.255.255:5000", "232.0.0.1:1"], arbitration = "content", emitter_grace = "1m30s"
  }
  "prod" = {
    port = 6667, groups = ["239.0.0.0/8"], ttl = 1, max_connections = 64
    # Rotation: the old key by name, the new one by ARN in another region.
    auth_key_parameters = ["/relayd/prod/key-1", "arn:aws:ssm:ap-northeast-1:111122223333:parameter/relayd/prod/key-2"]
  }
}

data_centre_cidrs   = ["10.20.0.0/16", "192.168.10.128/25", "203.0.113.7/32"]
health_port         = 9100
multicast_interface = "ens5"
log_level           = "debug"
instance            = { ami_id = "ami-0123456789abcdef0" }
