# Node identities. Least privilege:
# - every node (head and workers) may list, read, write and delete objects under the store prefix of the one
#   bucket, use its KMS key through S3 only, and read the optional source-image buckets;
# - only the head may launch and tag instances for the Ray autoscaler, stop/terminate only instances of its
#   own cluster, and pass only the worker role to the instances it launches.

locals {
  store_objects = "${aws_s3_bucket.store.arn}/${var.store_prefix}*"
}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "store_access" {
  statement {
    sid       = "ListStorePrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.store.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.store_prefix}*"]
    }
  }

  statement {
    sid       = "BucketLocationAndUploads"
    actions   = ["s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.store.arn]
  }

  statement {
    sid = "ReadWriteStoreObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [local.store_objects]
  }

  statement {
    sid       = "StoreKeyThroughS3Only"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.store.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }

  dynamic "statement" {
    for_each = length(var.source_bucket_arns) > 0 ? [1] : []

    content {
      sid       = "ReadSourceImages"
      actions   = ["s3:ListBucket", "s3:GetObject", "s3:GetBucketLocation"]
      resources = concat(var.source_bucket_arns, [for arn in var.source_bucket_arns : "${arn}/*"])
    }
  }
}

resource "aws_iam_policy" "store_access" {
  name        = "${var.name_prefix}-store-access"
  description = "TSDN Ray nodes: read/write the artefact store prefix of ${var.bucket_name}"
  policy      = data.aws_iam_policy_document.store_access.json
}

# --- workers -------------------------------------------------------------------------------------

resource "aws_iam_role" "node" {
  name               = "${var.name_prefix}-node"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "node_store" {
  role       = aws_iam_role.node.name
  policy_arn = aws_iam_policy.store_access.arn
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name_prefix}-node"
  role = aws_iam_role.node.name
}

# --- head ----------------------------------------------------------------------------------------

resource "aws_iam_role" "head" {
  name               = "${var.name_prefix}-head"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "head_store" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.store_access.arn
}

data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid = "Describe"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "LaunchWorkers"
    actions   = ["ec2:RunInstances"]
    resources = ["*"]
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["arn:aws:ec2:${var.region}:*:instance/*", "arn:aws:ec2:${var.region}:*:volume/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "ManageOwnClusterOnly"
    actions   = ["ec2:CreateTags", "ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"]
    resources = ["arn:aws:ec2:${var.region}:*:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }

  statement {
    sid       = "PassWorkerRoleOnly"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.node.arn]
  }

  statement {
    sid       = "ReadWorkerProfile"
    actions   = ["iam:GetInstanceProfile"]
    resources = [aws_iam_instance_profile.node.arn]
  }
}

resource "aws_iam_role_policy" "head_autoscaler" {
  name   = "ray-autoscaler"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name_prefix}-head"
  role = aws_iam_role.head.name
}

# --- KubeRay pods on EKS (IRSA), optional -------------------------------------------------------

locals {
  irsa_enabled = var.eks_oidc_provider_arn != ""
  k8s_sa_parts = split("/", var.k8s_service_account)
}

data "aws_iam_policy_document" "irsa_assume" {
  count = local.irsa_enabled ? 1 : 0

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.eks_oidc_provider_url}:sub"
      values   = ["system:serviceaccount:${local.k8s_sa_parts[0]}:${local.k8s_sa_parts[1]}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.eks_oidc_provider_url}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "irsa" {
  count              = local.irsa_enabled ? 1 : 0
  name               = "${var.name_prefix}-irsa"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume[0].json
}

resource "aws_iam_role_policy_attachment" "irsa_store" {
  count      = local.irsa_enabled ? 1 : 0
  role       = aws_iam_role.irsa[0].name
  policy_arn = aws_iam_policy.store_access.arn
}
