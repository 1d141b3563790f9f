# stasis on Nomad: one `stasis serve` per KVM client node (a `system` job),
# registered as the Nomad service "stasis" with an HTTP health check, found
# by its peers through Nomad's service API (--pool-discovery nomad).
#
# Before running it (see README "Running a pool"):
# - each KVM client's agent config has `meta { kvm = "true" }`, the raw_exec
#   plugin enabled, and `max_kill_timeout` of at least this job's
#   kill_timeout (Nomad's default is 30s, too short for the drain);
# - the stasis binary is at var.stasis_binary on every client (or use an
#   `artifact` block);
# - the secrets are a Nomad Variable at nomad/jobs/stasis with the items
#   database_url, api_key, s3_access_key_id, s3_secret_access_key.
#
# Validated offline by deploy/validate.sh (tests/deploy.rs).

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "stasis_binary" {
  type    = string
  default = "/usr/local/bin/stasis"
}

variable "data_dir" {
  type    = string
  default = "/var/lib/stasis"
}

variable "chunk_cache_dir" {
  type    = string
  default = "/var/cache/stasis/chunks"
}

variable "snapshot_store" {
  type    = string
  default = "s3://stasis-snapshots"
}

variable "s3_endpoint" {
  type    = string
  default = "https://s3.example.internal:9000"
}

job "stasis" {
  type        = "system"
  datacenters = var.datacenters

  # Linux on x86_64 with KVM: the operator labels KVM clients.
  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  constraint {
    attribute = "${attr.cpu.arch}"
    value     = "amd64"
  }

  constraint {
    attribute = "${meta.kvm}"
    value     = "true"
  }

  # One host at a time: each restart drains its host (its sandboxes pause,
  # upload and resume elsewhere) before the next one starts.
  update {
    max_parallel     = 1
    min_healthy_time = "30s"
    healthy_deadline = "5m"
  }

  group "stasis" {
    network {
      port "http" {
        static = 3000
      }
    }

    service {
      name     = "stasis"
      provider = "nomad"
      port     = "http"
      tags     = ["api"]

      check {
        name     = "health"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "serve" {
      driver = "raw_exec"

      # SIGTERM starts the drain: every running sandbox is paused and its
      # upload awaited for at most --shutdown-pause-secs (240); the kill
      # timeout leaves a minute more before SIGKILL.
      kill_signal  = "SIGTERM"
      kill_timeout = "300s"

      # A workload identity token in NOMAD_TOKEN: reads the "stasis"
      # service registrations of this namespace.
      identity {
        env = true
      }

      config {
        command = var.stasis_binary
        args = [
          "serve",
          "--listen", "0.0.0.0:${NOMAD_PORT_http}",
          "--data-dir", var.data_dir,
          "--api-key-file", "${NOMAD_SECRETS_DIR}/api-key",
          "--shutdown-pause-secs", "240",
          "--pool-discovery", "nomad",
          "--nomad-addr", "http://${attr.unique.network.ip-address}:4646",
          "--nomad-service", "stasis",
          "--pool-host-id", "${node.unique.name}",
          "--pool-advertise", "${NOMAD_ADDR_http}",
          "--database", "${STASIS_DATABASE}",
          "--snapshot-store", var.snapshot_store,
          "--s3-endpoint", var.s3_endpoint,
          "--chunk-cache-dir", var.chunk_cache_dir,
        ]
      }

      # Secrets from the Nomad Variable, rendered into the secrets dir and
      # the task's environment. The database URL reaches --database through
      # ${STASIS_DATABASE}, so it is in the host's process list like any
      # argument (the S3 keys and the API key are not).
      template {
        destination = "${NOMAD_SECRETS_DIR}/stasis.env"
        env         = true
        perms       = "600"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/stasis" }}
          STASIS_DATABASE={{ .database_url }}
          AWS_ACCESS_KEY_ID={{ .s3_access_key_id }}
          AWS_SECRET_ACCESS_KEY={{ .s3_secret_access_key }}
          {{ end }}
        EOT
      }

      template {
        destination = "${NOMAD_SECRETS_DIR}/api-key"
        perms       = "600"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/stasis" }}{{ .api_key }}{{ end }}
        EOT
      }

      env {
        STASIS_LOG = "info"
        AWS_REGION = "us-east-1"
      }

      # raw_exec does not confine the task: these are what the scheduler
      # reserves for stasis itself; sandboxes' memory is bounded by
      # --max-memory-share of the host's RAM.
      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
