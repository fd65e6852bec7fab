//! Singleton work: a task that runs on the master only (the Allegra seed's index updater).

use std::future::Future;
use std::time::Duration;

use grapevine_membership::Membership;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a master task may take to stop after its token is cancelled before it is aborted.
pub const MASTER_TASK_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A supervisor that starts a task when this member becomes master and stops it when it no
/// longer is. Stop it with [`MasterTask::stop`]; dropping it cancels it too.
#[derive(Debug)]
pub struct MasterTask {
    cancel: CancellationToken,
    supervisor: Option<JoinHandle<()>>,
}

impl MasterTask {
    pub(crate) fn spawn<F, Fut>(name: String, membership: Membership, parent: &CancellationToken, mut make: F) -> Self
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cancel = parent.child_token();
        let token = cancel.clone();
        let supervisor = tokio::spawn(async move {
            let mut views = membership.watch();
            let mut running: Option<(CancellationToken, JoinHandle<()>)> = None;
            loop {
                let is_master = views.borrow_and_update().is_master();
                match (&mut running, is_master) {
                    (None, true) => {
                        info!(task = %name, "this member is master: starting singleton task");
                        let child = token.child_token();
                        running = Some((child.clone(), tokio::spawn(make(child))));
                    }
                    (Some(_), false) => {
                        info!(task = %name, "this member is no longer master: stopping singleton task");
                        stop_task(&name, running.take()).await;
                    }
                    _ => {}
                }
                tokio::select! {
                    changed = views.changed() => if changed.is_err() { break },
                    _ = token.cancelled() => break,
                }
            }
            stop_task(&name, running.take()).await;
        });
        MasterTask { cancel, supervisor: Some(supervisor) }
    }

    /// Stops the supervisor and the task, waiting for both.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.await;
        }
    }
}

impl Drop for MasterTask {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn stop_task(name: &str, running: Option<(CancellationToken, JoinHandle<()>)>) {
    let Some((token, mut handle)) = running else { return };
    token.cancel();
    if tokio::time::timeout(MASTER_TASK_STOP_TIMEOUT, &mut handle).await.is_err() {
        warn!(task = %name, "singleton task ignored cancellation for {MASTER_TASK_STOP_TIMEOUT:?}; aborting it");
        handle.abort();
        let _ = handle.await;
    }
}
