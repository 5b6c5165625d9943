# The artefact store: datasets/, runs/, registry/, scores/ under var.store_prefix (docs/ARCHITECTURE.md).

resource "aws_kms_key" "store" {
  description             = "SSE-KMS key of the TSDN artefact bucket ${var.bucket_name}"
  deletion_window_in_days = 30
  enable_key_rotation     = true
}

resource "aws_kms_alias" "store" {
  name          = "alias/${var.name_prefix}-store"
  target_key_id = aws_kms_key.store.key_id
}

resource "aws_s3_bucket" "store" {
  bucket = var.bucket_name
}

resource "aws_s3_bucket_ownership_controls" "store" {
  bucket = aws_s3_bucket.store.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "store" {
  bucket                  = aws_s3_bucket.store.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# Versioning: an overwritten best.json, model or score shard can be recovered; the lifecycle rules below bound
# how long the old versions are kept.
resource "aws_s3_bucket_versioning" "store" {
  bucket = aws_s3_bucket.store.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  bucket = aws_s3_bucket.store.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.store.arn
    }
    # One data key per bucket instead of one KMS call per object: Ray Data writes many shards.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  bucket = aws_s3_bucket.store.id

  # Lifecycle rules on a versioned bucket need versioning configured first.
  depends_on = [aws_s3_bucket_versioning.store]

  rule {
    id     = "run-artefacts"
    status = "Enabled"

    filter {
      prefix = "${var.store_prefix}runs/"
    }

    expiration {
      days = var.run_retention_days
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_retention_days
    }
  }

  rule {
    id     = "datasets-and-scores-old-versions"
    status = "Enabled"

    filter {
      or {
        prefixes = ["${var.store_prefix}datasets/", "${var.store_prefix}scores/"]
      }
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_retention_days
    }
  }

  rule {
    id     = "registry-history"
    status = "Enabled"

    filter {
      prefix = "${var.store_prefix}registry/"
    }

    noncurrent_version_expiration {
      noncurrent_days = var.registry_noncurrent_retention_days
    }
  }

  rule {
    id     = "housekeeping"
    status = "Enabled"

    filter {}

    # Multipart uploads of a job killed mid-write (pyarrow uploads large shards and checkpoints in parts).
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }

    expiration {
      expired_object_delete_marker = true
    }
  }
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.store.arn,
      "${aws_s3_bucket.store.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "store" {
  bucket = aws_s3_bucket.store.id
  policy = data.aws_iam_policy_document.bucket.json

  depends_on = [aws_s3_bucket_public_access_block.store]
}
