################################################################################
# ECR repository of the relayd image (mode = "ecs")
################################################################################

# Built by container/build-image.sh and pushed by the release process; tags are immutable, so
# a task definition names one image for good, and every push is scanned.
resource "aws_ecr_repository" "relayd" {
  count = local.ecs ? 1 : 0

  name                 = "${var.name}/relayd"
  image_tag_mutability = "IMMUTABLE"
  force_delete         = false

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.this.arn
  }

  tags = local.tags
}

resource "aws_ecr_lifecycle_policy" "relayd" {
  count = local.ecs ? 1 : 0

  repository = aws_ecr_repository.relayd[0].name
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Untagged layers of interrupted pushes"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = var.ecs.untagged_image_days
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Keep the newest images (rollbacks need the previous ones)"
        selection = {
          tagStatus   = "any"
          countType   = "imageCountMoreThan"
          countNumber = var.ecs.keep_images
        }
        action = { type = "expire" }
      },
    ]
  })
}
