//! The Identity service: plugin name and version, capabilities, and readiness.

use tonic::{Request, Response, Status};

use super::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    PluginCapability, ProbeRequest, ProbeResponse, identity_server::Identity, plugin_capability,
};
use super::{CsiConfig, ServiceMode};

#[derive(Debug, Clone)]
pub struct IdentityService {
    driver_name: String,
    mode: ServiceMode,
}

impl IdentityService {
    pub fn new(config: &CsiConfig) -> Self {
        IdentityService { driver_name: config.driver_name.clone(), mode: config.mode }
    }
}

fn service(t: plugin_capability::service::Type) -> PluginCapability {
    PluginCapability { r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = Vec::new();
        if self.mode.controller() {
            capabilities.push(service(plugin_capability::service::Type::ControllerService));
        }
        // Expansion only records the new capacity, so it is safe while the volume is in use.
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                r#type: plugin_capability::volume_expansion::Type::Online as i32,
            })),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        // A node cannot mount anything without the FUSE device.
        let ready = !self.mode.node() || std::path::Path::new("/dev/fuse").exists();
        tracing::trace!(ready, "probe");
        if !ready {
            return Err(Status::failed_precondition("/dev/fuse is missing: the node plugin needs the FUSE device"));
        }
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
