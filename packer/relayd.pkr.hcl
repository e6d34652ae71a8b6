locals {
  # The image version is the package version, read from the source it is built from.
  version = regex_replace(
    file("${path.root}/../relayd/__init__.py"), "(?s).*__version__ = \"([^\"]+)\".*", "$1"
  )
  timestamp = formatdate("YYYYMMDDhhmmss", timestamp())
  dist_dir  = var.dist_dir != "" ? var.dist_dir : "${path.root}/../dist"
  staging   = "/tmp/relayd-install"
}

source "amazon-ebs" "relayd" {
  region        = var.region
  ami_regions   = [for r in var.ami_regions : r if r != var.region]
  instance_type = var.instance_type
  subnet_id     = var.subnet_id

  source_ami_filter {
    owners      = ["amazon"]
    most_recent = true
    filters = {
      name                = "al2023-ami-ecs-hvm-*-kernel-6.1-x86_64"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
  }

  ami_name        = "relayd-${local.version}-${local.timestamp}"
  ami_description = "relayd ${local.version} multicast relay on Amazon Linux 2023 (ECS-optimized)"
  ssh_username    = "ec2-user"

  # modern-only: begin (Packer < 1.7 rejects these; see packer/README.md)
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"
  # modern-only: end

  encrypt_boot = true
  kms_key_id   = var.kms_key_id

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.root_volume_size
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    encrypted             = true
    delete_on_termination = true
  }

  tags = {
    Name          = "relayd-${local.version}"
    Version       = local.version
    SourceAMI     = "{{ .SourceAMI }}"
    SourceAMIName = "{{ .SourceAMIName }}"
    BuildRegion   = "{{ .BuildRegion }}"
  }
  run_tags = {
    Name = "packer-relayd-${local.version}"
  }
}

build {
  sources = ["source.amazon-ebs.relayd"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.staging}/dist ${local.staging}/tree"]
  }

  provisioner "file" {
    source      = "${local.dist_dir}/"
    destination = "${local.staging}/dist"
  }

  # The rootfs tree, as it is in the repository, and the docs for /usr/share/doc/relayd.
  provisioner "file" {
    sources = [
      "${path.root}/../etc", "${path.root}/../systemd", "${path.root}/../docs",
      "${path.root}/../README.md", "${path.root}/../CHANGELOG.md",
    ]
    destination = "${local.staging}/tree/"
  }

  provisioner "shell" {
    environment_vars = [
      "RELAYD_WHEEL_DIR=${local.staging}/dist",
      "RELAYD_TREE=${local.staging}/tree",
    ]
    execute_command = "sudo env {{ .Vars }} bash '{{ .Path }}'"
    scripts = [
      "${path.root}/scripts/install.sh",
      "${path.root}/scripts/ecs-agent.sh",
      "${path.root}/scripts/validate.sh",
      "${path.root}/scripts/cleanup.sh",
    ]
  }

  post-processor "manifest" {
    output     = "${local.dist_dir}/packer-manifest.json"
    strip_path = true
    custom_data = {
      version = local.version
    }
  }
}
