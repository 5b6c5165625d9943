output "bucket" {
  description = "The artefact bucket; the platform's store URI is store_uri."
  value       = aws_s3_bucket.store.bucket
}

output "store_uri" {
  description = "Pass as --store to every tsdn job and as args.store in infra/serve.yaml."
  value       = trimsuffix("s3://${aws_s3_bucket.store.bucket}/${var.store_prefix}", "/")
}

output "kms_key_arn" {
  description = "SSE-KMS key of the bucket."
  value       = aws_kms_key.store.arn
}

output "head_instance_profile_arn" {
  description = "ray_cluster.yaml: available_node_types.head.cpu.node_config.IamInstanceProfile.Arn"
  value       = aws_iam_instance_profile.head.arn
}

output "node_instance_profile_arn" {
  description = "ray_cluster.yaml: IamInstanceProfile.Arn of every worker node type (gpu.1x, gpu.4x)."
  value       = aws_iam_instance_profile.node.arn
}

output "irsa_role_arn" {
  description = "infra/kuberay/serviceaccount.yaml: the eks.amazonaws.com/role-arn annotation (null without EKS)."
  value       = local.irsa_enabled ? aws_iam_role.irsa[0].arn : null
}
