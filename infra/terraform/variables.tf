variable "region" {
  description = "AWS region of the bucket and the Ray cluster (ray_cluster.yaml provider.region)."
  type        = string
  default     = "eu-west-1"
}

variable "bucket_name" {
  description = "Name of the artefact bucket: the platform's store is s3://<bucket_name>/<store_prefix>."
  type        = string
}

variable "store_prefix" {
  description = "Key prefix of the store inside the bucket, with a trailing slash (\"\" for the bucket root)."
  type        = string
  default     = ""

  validation {
    condition     = var.store_prefix == "" || endswith(var.store_prefix, "/")
    error_message = "store_prefix must be empty or end with '/'."
  }
}

variable "cluster_name" {
  description = "Ray cluster_name in ray_cluster.yaml; the head may only stop, start and terminate instances tagged with it."
  type        = string
  default     = "tsdn"
}

variable "name_prefix" {
  description = "Prefix of the IAM role, instance profile, policy and KMS alias names."
  type        = string
  default     = "tsdn-ray"
}

variable "source_bucket_arns" {
  description = "Buckets holding raw inspection images that ingest and scoring may read (read-only), e.g. arn:aws:s3:::plant-images."
  type        = list(string)
  default     = []
}

variable "run_retention_days" {
  description = "Days after which Ray Train run directories (runs/: checkpoints, logs) expire. Promoted models live in registry/ and are not affected."
  type        = number
  default     = 90
}

variable "noncurrent_retention_days" {
  description = "Days a replaced or deleted version of a run, dataset or score object is kept (versioning)."
  type        = number
  default     = 30
}

variable "registry_noncurrent_retention_days" {
  description = "Days a replaced registry object (best.json pointer history, model versions) is kept, for audit and rollback."
  type        = number
  default     = 365
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider; when set, an IRSA role for the KubeRay pods is created."
  type        = string
  default     = ""
}

variable "eks_oidc_provider_url" {
  description = "Issuer URL of that OIDC provider without https:// (oidc.eks.<region>.amazonaws.com/id/<ID>)."
  type        = string
  default     = ""
}

variable "k8s_service_account" {
  description = "namespace/name of the Kubernetes service account of the Ray pods (infra/kuberay/serviceaccount.yaml)."
  type        = string
  default     = "default/tsdn-ray"
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
