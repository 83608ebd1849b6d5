//! The Controller service: a bucket per volume (or a prefix per volume in a shared bucket),
//! recorded by a marker object, and deleted, emptied-only or kept according to `onDelete`.
//!
//! Invariants: a bucket or prefix is only ever deleted when its marker names this driver and
//! the volume; the marker is deleted last, so an interrupted purge is simply retried; repeating
//! any call with the same arguments returns the same result.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::proto::{
    ControllerExpandVolumeRequest, ControllerExpandVolumeResponse, ControllerGetCapabilitiesRequest,
    ControllerGetCapabilitiesResponse, ControllerGetVolumeRequest, ControllerGetVolumeResponse,
    ControllerModifyVolumeRequest, ControllerModifyVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateSnapshotRequest, CreateSnapshotResponse, CreateVolumeRequest,
    CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse, DeleteVolumeRequest, DeleteVolumeResponse,
    GetCapacityRequest, GetCapacityResponse, GetSnapshotRequest, GetSnapshotResponse, ListSnapshotsRequest,
    ListSnapshotsResponse, ListVolumesRequest, ListVolumesResponse, ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse, Volume, VolumeCapability, controller_server::Controller,
    controller_service_capability, list_volumes_response, validate_volume_capabilities_response, volume_capability,
};
use super::volume::{CreateParams, MountOptions, OnDelete, VolumeId, VolumeRecord};
use super::{CsiConfig, CsiError, KeyLocks, Secrets, rpc};
use crate::config::S3Config;
use crate::s3::S3Error;
use crate::s3::admin::{BucketAdmin, CreateOutcome};
use crate::s3::aws::build_client;

/// Prefix of ListVolumes paging tokens (`v1:<last volume id>`), so a foreign string is rejected.
const TOKEN_PREFIX: &str = "v1:";
/// Marker reads in flight at once while listing volumes.
const LIST_CONCURRENCY: usize = 16;

#[derive(Debug)]
pub struct ControllerService {
    driver: String,
    base: S3Config,
    ca_dir: PathBuf,
    clients: Mutex<HashMap<String, BucketAdmin>>,
    locks: KeyLocks,
}

/// What the marker of a volume says.
#[derive(Debug)]
enum Marker {
    NoBucket,
    Absent,
    Ours(VolumeRecord),
    Foreign(VolumeRecord),
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Checks one capability: required parts present, mount access only, a known access mode, and
/// valid mount flags.
pub(crate) fn check_capability(cap: &VolumeCapability) -> Result<(), CsiError> {
    use volume_capability::access_mode::Mode;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| CsiError::InvalidArgument("volume capability has no access_mode".into()))?;
    match Mode::try_from(mode.mode) {
        Ok(Mode::Unknown) | Err(_) => {
            return Err(CsiError::InvalidArgument(format!("unsupported access mode {}", mode.mode)));
        }
        Ok(_) => {}
    }
    match &cap.access_type {
        None => Err(CsiError::InvalidArgument("volume capability has no access_type (mount or block)".into())),
        Some(volume_capability::AccessType::Block(_)) => Err(CsiError::InvalidArgument(
            "block volumes are not supported: s3csi volumes are filesystems (use volumeMode: Filesystem)".into(),
        )),
        Some(volume_capability::AccessType::Mount(m)) => {
            MountOptions::build(&HashMap::new(), &m.mount_flags, None).map(|_| ()).map_err(CsiError::InvalidArgument)
        }
    }
}

pub(crate) fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), CsiError> {
    if caps.is_empty() {
        return Err(CsiError::InvalidArgument("volume_capabilities is empty".into()));
    }
    caps.iter().try_for_each(check_capability)
}

/// (required, limit) from a capacity range, validated; 0 means unset.
fn capacity_range(range: Option<&super::proto::CapacityRange>) -> Result<(i64, i64), CsiError> {
    let (req, lim) = range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
    if req < 0 || lim < 0 {
        return Err(CsiError::InvalidArgument("capacity_range bytes must not be negative".into()));
    }
    if lim > 0 && req > lim {
        return Err(CsiError::OutOfRange(format!("required_bytes {req} exceeds limit_bytes {lim}")));
    }
    Ok((req, lim))
}

fn fits(capacity: i64, (req, lim): (i64, i64)) -> bool {
    (req == 0 || capacity >= req) && (lim == 0 || capacity <= lim)
}

impl ControllerService {
    pub fn new(config: &CsiConfig) -> Self {
        ControllerService {
            driver: config.driver_name.clone(),
            base: config.s3.clone(),
            ca_dir: config.state_dir.join("ca"),
            clients: Mutex::new(HashMap::new()),
            locks: KeyLocks::default(),
        }
    }

    /// An S3 client for the settings in `secrets` (cached per distinct settings).
    async fn admin(&self, secrets: &Secrets) -> Result<BucketAdmin, CsiError> {
        let vs = secrets.volume_s3()?;
        let mut cfg = vs.apply(&self.base);
        let mut h = Sha256::new();
        for part in [
            cfg.endpoint_url.as_deref(),
            cfg.region.as_deref(),
            cfg.credentials.as_ref().map(|c| c.access_key_id.as_str()),
            cfg.credentials.as_ref().map(|c| c.secret_access_key.as_str()),
            cfg.credentials.as_ref().and_then(|c| c.session_token.as_deref()),
            vs.ca_pem.as_deref(),
        ] {
            h.update(part.unwrap_or("\u{0}").as_bytes());
            h.update([0xff]);
        }
        let key = hex::encode(h.finalize());
        if let Some(admin) = self.clients.lock().expect("client cache is not poisoned").get(&key) {
            return Ok(admin.clone());
        }
        if let Some(pem) = &vs.ca_pem {
            let path = self.ca_dir.join(format!("{}.pem", &key[..16]));
            std::fs::create_dir_all(&self.ca_dir)
                .and_then(|_| std::fs::write(&path, pem))
                .map_err(|e| CsiError::Internal(format!("cannot write CA bundle {}: {e}", path.display())))?;
            cfg.ca_bundle = Some(path);
        }
        let client = build_client(&cfg).await.map_err(|e| CsiError::FailedPrecondition(e.to_string()))?;
        let admin = BucketAdmin::new(client);
        self.clients.lock().expect("client cache is not poisoned").insert(key, admin.clone());
        Ok(admin)
    }

    async fn read_marker(&self, admin: &BucketAdmin, id: &VolumeId) -> Result<Marker, CsiError> {
        let key = id.marker_key();
        match admin.get_small(&id.bucket, &key).await {
            // Some servers answer a GET in a missing bucket with NoSuchKey: ask about the bucket.
            Ok(None) => match admin.bucket_exists(&id.bucket).await {
                Ok(true) => Ok(Marker::Absent),
                Ok(false) => Ok(Marker::NoBucket),
                Err(e) => Err(CsiError::s3(&format!("looking up bucket {}", id.bucket), &e)),
            },
            Ok(Some(data)) => {
                let rec = VolumeRecord::from_json(&data).map_err(|e| {
                    CsiError::Internal(format!("s3://{}/{key}: {e}; repair or remove it by hand", id.bucket))
                })?;
                Ok(if rec.driver == self.driver { Marker::Ours(rec) } else { Marker::Foreign(rec) })
            }
            Err(S3Error::NoSuchBucket(_)) => Ok(Marker::NoBucket),
            Err(e) => Err(CsiError::s3(&format!("reading the volume marker of {id}"), &e)),
        }
    }

    async fn write_marker(&self, admin: &BucketAdmin, id: &VolumeId, rec: &VolumeRecord) -> Result<(), CsiError> {
        admin
            .put_small(&id.bucket, &id.marker_key(), rec.to_json(), "application/json")
            .await
            .map_err(|e| CsiError::s3(&format!("writing the volume marker of {id}"), &e))
    }

    /// Whether a volume's data exists at all (for static volumes without a marker).
    async fn exists(&self, admin: &BucketAdmin, id: &VolumeId) -> Result<bool, CsiError> {
        let what = format!("looking up volume {id}");
        match self.read_marker(admin, id).await? {
            Marker::NoBucket => Ok(false),
            Marker::Ours(rec) => Ok(rec.released_unix.is_none()),
            Marker::Foreign(_) => Ok(true),
            Marker::Absent if id.is_bucket() => Ok(true),
            Marker::Absent => admin
                .first_keys(&id.bucket, &id.prefix, 1)
                .await
                .map(|k| !k.is_empty())
                .map_err(|e| CsiError::s3(&what, &e)),
        }
    }

    async fn create(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse, CsiError> {
        if req.name.is_empty() {
            return Err(CsiError::InvalidArgument("name is required".into()));
        }
        check_capabilities(&req.volume_capabilities)?;
        let range = capacity_range(req.capacity_range.as_ref())?;
        if req.volume_content_source.is_some() {
            return Err(CsiError::InvalidArgument(
                "volume_content_source is not supported: s3csi cannot clone volumes or restore snapshots".into(),
            ));
        }
        let params = CreateParams::parse(&req.parameters).map_err(CsiError::InvalidArgument)?;
        let _guard = self.locks.lock(&req.name).await;
        let id = params.volume_id(&req.name);
        let admin = self.admin(&Secrets::new(req.secrets)).await?;
        let capacity = if range.0 > 0 { range.0 } else { range.1 };
        let new_record = VolumeRecord {
            driver: self.driver.clone(),
            name: req.name.clone(),
            capacity_bytes: capacity,
            on_delete: params.on_delete,
            created_unix: now_unix(),
            released_unix: None,
            context: params.context.clone(),
        };
        let record = match self.read_marker(&admin, &id).await? {
            Marker::Ours(rec) if rec.name == req.name => {
                if !fits(rec.capacity_bytes, range) {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {id} for {:?} exists with capacity {} bytes, incompatible with the requested range",
                        req.name, rec.capacity_bytes
                    )));
                }
                if rec.released_unix.is_some() {
                    let rec = VolumeRecord { released_unix: None, ..rec };
                    self.write_marker(&admin, &id, &rec).await?;
                    rec
                } else {
                    rec
                }
            }
            Marker::Ours(rec) | Marker::Foreign(rec) => {
                return Err(CsiError::AlreadyExists(format!(
                    "{id} already holds volume {:?} of driver {}; choose another namePrefix",
                    rec.name, rec.driver
                )));
            }
            Marker::NoBucket if !id.is_bucket() => {
                return Err(CsiError::FailedPrecondition(format!(
                    "the shared bucket {:?} named by the StorageClass parameter bucket does not exist; create it first",
                    id.bucket
                )));
            }
            Marker::NoBucket => {
                match admin.create_bucket(&id.bucket).await {
                    Ok(CreateOutcome::Created) => {
                        tracing::info!(bucket = %id.bucket, name = %req.name, "bucket created")
                    }
                    Ok(CreateOutcome::AlreadyOwned) => {}
                    Err(S3Error::Service { code, .. }) if code == "BucketAlreadyExists" => {
                        return Err(CsiError::AlreadyExists(format!(
                            "bucket name {:?} is taken by another account; set the StorageClass parameter namePrefix",
                            id.bucket
                        )));
                    }
                    Err(e) => return Err(CsiError::s3(&format!("creating bucket {}", id.bucket), &e)),
                }
                self.write_marker(&admin, &id, &new_record).await?;
                new_record
            }
            Marker::Absent => {
                // Our bucket from an interrupted earlier attempt is empty; anything else is not ours.
                let keys = admin
                    .first_keys(&id.bucket, &id.prefix, 1)
                    .await
                    .map_err(|e| CsiError::s3(&format!("checking {id}"), &e))?;
                if let Some(k) = keys.first() {
                    return Err(CsiError::AlreadyExists(format!(
                        "{id} already exists with data (e.g. {k:?}) that s3csi did not create; choose another namePrefix"
                    )));
                }
                self.write_marker(&admin, &id, &new_record).await?;
                new_record
            }
        };
        Ok(CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes: record.capacity_bytes,
                volume_id: id.to_string(),
                volume_context: record.context.into_iter().collect(),
                ..Default::default()
            }),
        })
    }

    async fn delete(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()));
        }
        let Ok(id) = req.volume_id.parse::<VolumeId>() else {
            tracing::info!(volume = %req.volume_id, "not an s3csi volume id; nothing to delete");
            return Ok(DeleteVolumeResponse {});
        };
        let _guard = self.locks.lock(&req.volume_id).await;
        let admin = self.admin(&Secrets::new(req.secrets)).await?;
        let rec = match self.read_marker(&admin, &id).await? {
            Marker::NoBucket => return Ok(DeleteVolumeResponse {}),
            Marker::Absent => {
                tracing::info!(volume = %id, "no s3csi marker: not created by this driver, data left untouched");
                return Ok(DeleteVolumeResponse {});
            }
            Marker::Foreign(rec) => {
                tracing::warn!(volume = %id, driver = %rec.driver, "volume belongs to another driver; left untouched");
                return Ok(DeleteVolumeResponse {});
            }
            Marker::Ours(rec) if rec.released_unix.is_some() => return Ok(DeleteVolumeResponse {}),
            Marker::Ours(rec) => rec,
        };
        match rec.on_delete {
            OnDelete::Keep => {
                let rec = VolumeRecord { released_unix: Some(now_unix()), ..rec };
                self.write_marker(&admin, &id, &rec).await?;
                tracing::info!(volume = %id, "volume released; data kept (onDelete: keep)");
                return Ok(DeleteVolumeResponse {});
            }
            OnDelete::IfEmpty => {
                /// Keys looked at: enough to see past the marker and empty directories' records.
                const IF_EMPTY_SCAN: i32 = 1000;
                let marker = id.marker_key();
                // The mount's directory attribute records describe data; they are not data.
                let keys = admin
                    .first_keys(&id.bucket, &id.prefix, IF_EMPTY_SCAN)
                    .await
                    .map_err(|e| CsiError::s3(&format!("listing {id}"), &e))?;
                let record = crate::fs::records::RECORD_NAME;
                let not_data = |k: &str| k == marker || k.rsplit('/').next() == Some(record);
                // A full page of records only: not proven empty, so not deleted.
                let unproven = keys.len() >= IF_EMPTY_SCAN as usize;
                if let Some(k) = keys.iter().find(|k| !not_data(k)).or(keys.last().filter(|_| unproven)) {
                    let what = if id.is_bucket() { "bucket" } else { "prefix of bucket" };
                    return Err(CsiError::FailedPrecondition(format!(
                        "{what} {id} is not empty (it holds {k:?} and maybe more) and its StorageClass says \
                         onDelete: ifEmpty; empty it, or delete the PV and clean up by hand"
                    )));
                }
            }
            OnDelete::Purge => {}
        }
        let stats = admin
            .purge(&id.bucket, &id.prefix, &id.marker_key())
            .await
            .map_err(|e| CsiError::s3(&format!("purging {id}"), &e))?;
        if id.is_bucket() {
            admin.delete_bucket(&id.bucket).await.map_err(|e| CsiError::s3(&format!("deleting bucket {id}"), &e))?;
        }
        tracing::info!(
            volume = %id,
            objects = stats.objects,
            uploads = stats.uploads,
            versions_listed = stats.versions_listed,
            on_delete = %rec.on_delete,
            "volume deleted"
        );
        Ok(DeleteVolumeResponse {})
    }

    async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()));
        }
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::InvalidArgument("volume_capabilities is empty".into()));
        }
        for cap in &req.volume_capabilities {
            if cap.access_mode.is_none() || cap.access_type.is_none() {
                return Err(CsiError::InvalidArgument("each capability needs access_mode and access_type".into()));
            }
        }
        let id: VolumeId = req.volume_id.parse().map_err(CsiError::NotFound)?;
        let admin = self.admin(&Secrets::new(req.secrets)).await?;
        if !self.exists(&admin, &id).await? {
            return Err(CsiError::NotFound(format!("volume {id} does not exist")));
        }
        // Parameters and volume context by the same checks as CreateVolume and NodeStageVolume:
        // confirmed only if all of it would be accepted.
        let valid = check_capabilities(&req.volume_capabilities)
            .and_then(|()| CreateParams::parse(&req.parameters).map(drop).map_err(CsiError::InvalidArgument))
            .and_then(|()| {
                MountOptions::build(&req.volume_context, &[], None).map(drop).map_err(CsiError::InvalidArgument)
            });
        if let Err(e) = valid {
            return Ok(ValidateVolumeCapabilitiesResponse { confirmed: None, message: e.to_string() });
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    /// Every live volume of this driver visible with the default credentials, sorted by id.
    async fn all_volumes(&self, admin: &BucketAdmin) -> Result<Vec<(VolumeId, VolumeRecord)>, CsiError> {
        let buckets = admin.list_buckets().await.map_err(|e| CsiError::s3("listing buckets", &e))?;
        let found: Vec<Result<Vec<(VolumeId, VolumeRecord)>, CsiError>> = futures::stream::iter(buckets)
            .map(|bucket| async move {
                let root = VolumeId { bucket: bucket.clone(), prefix: String::new() };
                match self.read_marker(admin, &root).await? {
                    Marker::Ours(rec) => return Ok(vec![(root, rec)]),
                    Marker::Foreign(_) | Marker::NoBucket => return Ok(vec![]),
                    Marker::Absent => {}
                }
                // A bucket that is not a volume may hold prefix-per-volume volumes.
                let prefixes = match admin.top_level_prefixes(&bucket).await {
                    Ok(p) => p,
                    Err(S3Error::NoSuchBucket(_)) => return Ok(vec![]),
                    Err(e) => return Err(CsiError::s3(&format!("listing bucket {bucket}"), &e)),
                };
                let mut out = Vec::new();
                for prefix in prefixes {
                    let id = VolumeId { bucket: bucket.clone(), prefix };
                    if let Marker::Ours(rec) = self.read_marker(admin, &id).await? {
                        out.push((id, rec));
                    }
                }
                Ok(out)
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .collect()
            .await;
        let mut all = Vec::new();
        for r in found {
            all.extend(r?.into_iter().filter(|(_, rec)| rec.released_unix.is_none()));
        }
        all.sort_by_key(|(id, _)| id.to_string());
        Ok(all)
    }

    async fn list(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse, CsiError> {
        if req.max_entries < 0 {
            return Err(CsiError::InvalidArgument("max_entries must not be negative".into()));
        }
        let after = if req.starting_token.is_empty() {
            None
        } else {
            match req.starting_token.strip_prefix(TOKEN_PREFIX) {
                Some(id) if id.parse::<VolumeId>().is_ok() => Some(id.to_owned()),
                _ => {
                    return Err(CsiError::Aborted(format!(
                        "starting_token {:?} was not returned by ListVolumes; start again without one",
                        req.starting_token
                    )));
                }
            }
        };
        let admin = self.admin(&Secrets::default()).await?;
        let all = self.all_volumes(&admin).await?;
        let rest: Vec<_> =
            all.into_iter().filter(|(id, _)| after.as_ref().is_none_or(|a| id.to_string() > *a)).collect();
        let take = if req.max_entries == 0 { rest.len() } else { (req.max_entries as usize).min(rest.len()) };
        let next_token = if take < rest.len() { format!("{TOKEN_PREFIX}{}", rest[take - 1].0) } else { String::new() };
        let entries = rest
            .into_iter()
            .take(take)
            .map(|(id, rec)| list_volumes_response::Entry {
                volume: Some(Volume {
                    capacity_bytes: rec.capacity_bytes,
                    volume_id: id.to_string(),
                    volume_context: rec.context.into_iter().collect(),
                    ..Default::default()
                }),
                status: None,
            })
            .collect();
        Ok(ListVolumesResponse { entries, next_token })
    }

    async fn expand(&self, req: ControllerExpandVolumeRequest) -> Result<ControllerExpandVolumeResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()));
        }
        let Some(range) = req.capacity_range.as_ref() else {
            return Err(CsiError::InvalidArgument("capacity_range is required".into()));
        };
        let (req_bytes, lim) = capacity_range(Some(range))?;
        if let Some(cap) = &req.volume_capability {
            check_capability(cap)?;
        }
        let id: VolumeId = req.volume_id.parse().map_err(CsiError::NotFound)?;
        let _guard = self.locks.lock(&req.volume_id).await;
        let admin = self.admin(&Secrets::new(req.secrets)).await?;
        let rec = match self.read_marker(&admin, &id).await? {
            Marker::Ours(rec) if rec.released_unix.is_none() => rec,
            _ if self.exists(&admin, &id).await? => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} was not provisioned by this driver, so it has no recorded capacity to expand"
                )));
            }
            _ => return Err(CsiError::NotFound(format!("volume {id} does not exist"))),
        };
        let wanted = if req_bytes > 0 { req_bytes } else { lim };
        let capacity = rec.capacity_bytes.max(wanted);
        if capacity != rec.capacity_bytes {
            let rec = VolumeRecord { capacity_bytes: capacity, ..rec };
            self.write_marker(&admin, &id, &rec).await?;
        }
        Ok(ControllerExpandVolumeResponse { capacity_bytes: capacity, node_expansion_required: false })
    }
}

fn capability(t: controller_service_capability::rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc { r#type: t as i32 })),
    }
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!("{what} is not supported by s3csi")))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        rpc("CreateVolume", &name, self.create(req)).await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        rpc("DeleteVolume", &id, self.delete(req)).await
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume (no attach step is needed)")
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume (no attach step is needed)")
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        rpc("ValidateVolumeCapabilities", &id, self.validate(req)).await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        rpc("ListVolumes", "", self.list(request.into_inner())).await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        rpc("GetCapacity", "", async move {
            CreateParams::parse(&req.parameters).map_err(CsiError::InvalidArgument)?;
            // Object storage has no fixed size: report "unbounded" for what we can serve and
            // nothing for what we cannot (block volumes).
            let servable = req.volume_capabilities.iter().all(|c| check_capability(c).is_ok());
            Ok(GetCapacityResponse {
                available_capacity: if servable { i64::MAX } else { 0 },
                maximum_volume_size: None,
                minimum_volume_size: None,
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: vec![
                capability(Type::CreateDeleteVolume),
                capability(Type::ListVolumes),
                capability(Type::GetCapacity),
                capability(Type::ExpandVolume),
                capability(Type::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn create_snapshot(
        &self,
        _request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        unimplemented("CreateSnapshot")
    }

    async fn delete_snapshot(
        &self,
        _request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        unimplemented("DeleteSnapshot")
    }

    async fn get_snapshot(
        &self,
        _request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        unimplemented("GetSnapshot")
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        unimplemented("ListSnapshots")
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        rpc("ControllerExpandVolume", &id, self.expand(req)).await
    }

    async fn controller_get_volume(
        &self,
        _request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        unimplemented("ControllerGetVolume")
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume")
    }
}
