variable "region" {
  type        = string
  default     = "eu-west-2"
  description = "Region the build instance runs in; the AMI is registered here first."
}

variable "ami_regions" {
  type        = list(string)
  default     = ["eu-west-2", "ap-northeast-1"]
  description = "Regions the finished AMI must exist in (copied from the build region)."
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Build instance type; the image does not depend on it."
}

variable "root_volume_size" {
  type        = number
  default     = 30
  description = "Root volume size in GiB (gp3, encrypted)."
}

variable "kms_key_id" {
  type        = string
  default     = ""
  description = "KMS key for the root volume and AMI snapshots; empty uses the account's aws/ebs key."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance; empty lets Packer use the default VPC."
}

variable "dist_dir" {
  type        = string
  default     = ""
  description = "Directory with the relayd wheel (`make dist`); empty means ../dist."
}
