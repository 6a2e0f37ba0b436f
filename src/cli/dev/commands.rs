//! One method per `tokenvault dev` subcommand: each plays one role of the
//! tour (the product app, a sync worker, an admin) against the dev vault.

use super::*;

impl Dev {
    pub(super) async fn open(args: &DevArgs) -> Result<Self, CliError> {
        let file = read_env_file(&args.env_file)?;
        let server = args
            .server
            .clone()
            .or_else(|| file.get(SERVER_ENV).map(|s| s.to_string()))
            .unwrap_or_else(|| crate::cli::client::DEFAULT_SERVER.to_owned());
        let url = Url::parse(&server)
            .map_err(|e| CliError::usage(format!("--server {server:?}: {e}")))?;
        let loopback = match url.host() {
            Some(oauth2::url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
            Some(oauth2::url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
            Some(oauth2::url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        if url.scheme() != "http" || !loopback {
            return Err(CliError::usage(format!(
                "--server {server:?}: the dev commands talk to `tokenvault serve --dev`, \
                 which serves plaintext on loopback (http://127.0.0.1:…)"
            )));
        }
        let channel = Endpoint::from_shared(server.clone())
            .map_err(|e| CliError::usage(format!("--server {server:?}: {e}")))?
            .connect_timeout(DEFAULT_TIMEOUT)
            .timeout(DEFAULT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| CliError::unreachable(&server, &e))?;
        Ok(Self {
            channel,
            env_file: args.env_file.clone(),
            file,
            output: args.output,
        })
    }

    /// The key of `role`: its environment variable, else the env file.
    pub(super) fn bearer(&self, role: &DevRole) -> Result<DevBearer, CliError> {
        let key = match std::env::var(role.env) {
            Ok(key) => Zeroizing::new(key),
            Err(_) => match self.file.get(role.env) {
                Some(key) => key.clone(),
                None => {
                    return Err(CliError::usage(format!(
                        "{} is not set and {} does not hold it: start `tokenvault serve --dev` \
                         and paste the export lines it prints",
                        role.env,
                        self.env_file.display()
                    )));
                }
            },
        };
        let header = Zeroizing::new(format!("Bearer {}", key.trim()));
        let mut value = MetadataValue::try_from(header.as_str()).map_err(|_| {
            CliError::usage(format!(
                "{} holds characters not allowed in a header",
                role.env
            ))
        })?;
        value.set_sensitive(true);
        Ok(DevBearer(value))
    }

    pub(super) fn connections(
        &self,
        role: &DevRole,
    ) -> Result<ConnectionServiceClient<Authed>, CliError> {
        Ok(ConnectionServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer(role)?,
        ))
    }

    pub(super) fn leases(&self, role: &DevRole) -> Result<LeaseServiceClient<Authed>, CliError> {
        Ok(LeaseServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer(role)?,
        ))
    }

    pub(super) fn events(&self, role: &DevRole) -> Result<EventServiceClient<Authed>, CliError> {
        Ok(EventServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer(role)?,
        ))
    }

    /// `dev connect`: the whole OAuth flow, as a browser and the app would.
    pub(super) async fn connect(
        &self,
        tenant: String,
        account: String,
        integration: DevIntegration,
        email: Option<String>,
    ) -> Result<(), CliError> {
        let rpc = "ConnectionService.BeginAuthorization";
        let begun = answer(
            rpc,
            self.connections(&APP)?
                .begin_authorization(pb::BeginAuthorizationRequest {
                    tenant_id: tenant.clone(),
                    account_id: account.clone(),
                    integration: integration.proto() as i32,
                    login_hint: email,
                })
                .await,
        )?;
        let auth_url = Url::parse(&begun.authorization_url)
            .map_err(|e| CliError::failed(format!("{rpc}: the authorization URL: {e}")))?;
        self.say(&format!(
            "-> {rpc} as {}: state valid until {}",
            APP.identity,
            output::ts_text(begun.state_expires_at.as_ref())
        ))?;
        self.say(&format!(
            "-> the browser goes to Google: {}{} (scope={})",
            auth_url.origin().ascii_serialization(),
            auth_url.path(),
            query_value(&auth_url, "scope").unwrap_or_default()
        ))?;

        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(DEFAULT_TIMEOUT)
            .build()
            .map_err(|e| CliError::failed(format!("cannot build an HTTP client: {e}")))?;
        let consent = http.get(auth_url.as_str()).send().await.map_err(|e| {
            CliError::unreachable(auth_url.origin().ascii_serialization().as_str(), &e)
        })?;
        let location = consent
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Url::parse(v).ok())
            .filter(|_| consent.status().is_redirection())
            .ok_or_else(|| {
                CliError::failed(format!(
                    "Google answered {} instead of redirecting back: is this a vault started \
                     with `tokenvault serve --dev`?",
                    consent.status()
                ))
            })?;
        match query_value(&location, "error") {
            Some(error) => self.say(&format!(
                "-> Google refused (error={error}); back to the vault"
            ))?,
            None => self.say(&format!(
                "-> Google (simulated) signed the user in and got consent; back to {}{}",
                location.origin().ascii_serialization(),
                location.path()
            ))?,
        }

        let callback = http.get(location.as_str()).send().await.map_err(|e| {
            CliError::unreachable(location.origin().ascii_serialization().as_str(), &e)
        })?;
        let status = callback.status();
        let body = callback.text().await.unwrap_or_default();
        let page = body
            .split_once("<p>")
            .and_then(|(_, rest)| rest.split_once("</p>"))
            .map_or("", |(text, _)| text);
        self.say(&format!(
            "-> the vault's callback answered {status}: {page}"
        ))?;
        if !status.is_success() {
            return Err(CliError::failed(format!(
                "the connection failed: the vault's callback answered {status}"
            )));
        }

        let rpc = "ConnectionService.ListConnections";
        let list = answer(
            rpc,
            self.connections(&APP)?
                .list_connections(pb::ListConnectionsRequest {
                    tenant_id: tenant,
                    account_id: Some(account),
                    integration: Some(integration.proto() as i32),
                    ..Default::default()
                })
                .await,
        )?;
        // With several Google accounts on one integration, the one just
        // connected is the one updated last.
        let connection = list
            .connections
            .into_iter()
            .max_by_key(|c| {
                c.updated_at
                    .as_ref()
                    .map(|t| (t.seconds, t.nanos))
                    .unwrap_or_default()
            })
            .ok_or_else(|| CliError::failed(format!("{rpc}: no connection after the callback")))?;
        self.result(
            || output::connection_json(&connection),
            &connection_fields(&connection),
        )
    }

    /// `dev lease`: a token for a purpose, as that purpose's worker. The
    /// token itself is not printed, only its length.
    pub(super) async fn lease(
        &self,
        connection: String,
        purpose: String,
        scopes: Vec<String>,
    ) -> Result<(), CliError> {
        // The dev policy gives each purpose its integration's scopes; unless
        // the vault was told otherwise, those are the defaults.
        let defaults = crate::config::GoogleConfig::default();
        let (worker, default_scopes) = match purpose.as_str() {
            "email_sync" => (&EMAIL_WORKER, defaults.email_scopes),
            // Any other purpose is asked for as calendar-sync, and refused
            // by the policy unless it is calendar_sync.
            _ => (&CALENDAR_WORKER, defaults.calendar_scopes),
        };
        let scopes = if scopes.is_empty() {
            default_scopes
        } else {
            scopes
        };
        let rpc = "LeaseService.LeaseToken";
        self.say(&format!(
            "-> {rpc} as {} (purpose {purpose})",
            worker.identity
        ))?;
        let mut lease = answer(
            rpc,
            self.leases(worker)?
                .lease_token(pb::LeaseTokenRequest {
                    connection_id: connection.clone(),
                    purpose: purpose.clone(),
                    scopes,
                    min_valid_seconds: 0,
                })
                .await,
        )?;
        let token = Zeroizing::new(std::mem::take(&mut lease.access_token));
        let json = output::lease_json(&lease, &connection, &purpose, token.len());
        let mut f = Fields::new();
        f.add("lease_id", lease.lease_id.clone())
            .add("connection_id", connection)
            .add("purpose", purpose)
            .add("granted_scopes", output::list_text(&lease.granted_scopes))
            .add(
                "token_expires_at",
                output::ts_text(lease.token_expires_at.as_ref()),
            )
            .add(
                "lease_expires_at",
                output::ts_text(lease.lease_expires_at.as_ref()),
            )
            .add(
                "access_token",
                format!(
                    "{} characters, not shown (a worker sends it to Google as a Bearer token)",
                    token.len()
                ),
            );
        drop(token);
        output::print(self.output, || json, |out| f.write(out))
    }

    /// `dev disconnect`: Disconnect as the app; unless `ack` is false, each
    /// required consumer with a dev key acknowledges the deletion event; then
    /// the receipt.
    pub(super) async fn disconnect(
        &self,
        connection: String,
        reason: String,
        ack: bool,
    ) -> Result<(), CliError> {
        let rpc = "ConnectionService.Disconnect";
        let mut app = self.connections(&APP)?;
        let receipt = answer(
            rpc,
            app.disconnect(pb::DisconnectRequest {
                connection_id: connection.clone(),
                reason,
            })
            .await,
        )?
        .receipt
        .ok_or_else(|| CliError::missing_field(rpc, "receipt"))?;
        let waiting = if receipt.status == pb::ReceiptStatus::Complete as i32 {
            "complete".to_owned()
        } else {
            format!(
                "pending until acknowledged by {}",
                output::list_text(&receipt.required_consumers)
            )
        };
        self.say(&format!(
            "-> {rpc} as {}: tokens destroyed at {}, receipt {} ({waiting})",
            APP.identity,
            output::ts_text(receipt.tokens_destroyed_at.as_ref()),
            receipt.receipt_id,
        ))?;
        if ack {
            let acked: Vec<&str> = receipt
                .consumer_acks
                .iter()
                .map(|a| a.consumer.as_str())
                .collect();
            for consumer in &receipt.required_consumers {
                if acked.contains(&consumer.as_str()) {
                    // Disconnecting again answers the same receipt.
                    self.say(&format!(
                        "-> {consumer} has acknowledged this deletion already"
                    ))?;
                    continue;
                }
                let Ok(role) = consumer_role(consumer) else {
                    self.say(&format!(
                        "-> no dev key acts as {consumer}: the receipt waits for it"
                    ))?;
                    continue;
                };
                let target = Target {
                    connection: &connection,
                    receipt: &receipt.receipt_id,
                };
                self.acknowledge(role, consumer, Some(target)).await?;
            }
        }
        // The revocation at Google is confirmed within moments (inline, else
        // by the outbox); the acknowledgements complete the receipt.
        let rpc = "ConnectionService.GetDeletionReceipt";
        let deadline = Instant::now() + SETTLE;
        let receipt = loop {
            let r = answer(
                rpc,
                app.get_deletion_receipt(pb::GetDeletionReceiptRequest {
                    receipt_id: receipt.receipt_id.clone(),
                })
                .await,
            )?
            .receipt
            .ok_or_else(|| CliError::missing_field(rpc, "receipt"))?;
            if !ack || r.status == pb::ReceiptStatus::Complete as i32 || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut f = Fields::new();
        f.add("receipt_id", receipt.receipt_id.clone())
            .add(
                "status",
                short(
                    pb::ReceiptStatus::try_from(receipt.status)
                        .ok()
                        .map(|s| s.as_str_name()),
                    "RECEIPT_STATUS_",
                    receipt.status,
                ),
            )
            .add(
                "completed_at",
                output::ts_text(receipt.completed_at.as_ref()),
            )
            .add(
                "details",
                format!("tokenvault admin receipts show {}", receipt.receipt_id),
            );
        self.result(|| output::receipt_json(&receipt), &f)
    }

    /// Watches `consumer`'s events from its acknowledged position and
    /// acknowledges them: with a `target`, up to that deletion's event
    /// (printing the events of its connection); without, everything that
    /// arrives until the stream stays idle. Returns the cursor acknowledged.
    pub(super) async fn acknowledge(
        &self,
        role: &DevRole,
        consumer: &str,
        target: Option<Target<'_>>,
    ) -> Result<Acked, CliError> {
        let mut events = self.events(role)?;
        let mut stream = answer(
            "EventService.Watch",
            events
                .watch(pb::WatchRequest {
                    consumer: consumer.to_owned(),
                    ..Default::default()
                })
                .await,
        )?;
        self.say(&format!(
            "-> {consumer} (as {}) watches its events:",
            role.identity
        ))?;
        let deadline = Instant::now() + SETTLE;
        let mut last = None;
        let mut shown = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if target.is_some() {
                left
            } else {
                IDLE.min(left)
            };
            let event = match tokio::time::timeout(wait, stream.message()).await {
                Err(_) | Ok(Ok(None)) if target.is_some() => {
                    return Err(CliError::failed(format!(
                        "{consumer} saw no deletion event for {} within {SETTLE:?}",
                        target.as_ref().map_or("", |t| t.connection)
                    )));
                }
                Err(_) | Ok(Ok(None)) => break,
                Ok(Err(status)) => return Err(CliError::status("EventService.Watch", &status)),
                Ok(Ok(Some(event))) => event,
            };
            last = Some(event.cursor);
            let done = target
                .as_ref()
                .is_some_and(|t| t.receipt == event.receipt_id);
            if target
                .as_ref()
                .is_none_or(|t| t.connection == event.connection_id)
            {
                self.say(&format!("     {}", event_text(&event)))?;
                shown.push(event);
            }
            if done {
                break;
            }
        }
        drop(stream);
        let Some(cursor) = last else {
            return Ok(Acked {
                events: shown,
                position: None,
            });
        };
        let acked = answer(
            "EventService.Ack",
            events
                .ack(pb::AckRequest {
                    consumer: consumer.to_owned(),
                    cursor,
                })
                .await,
        )?;
        self.say(&format!(
            "-> {consumer} acknowledged {} (EventService.Ack up to #{})",
            if target.is_some() {
                "the deletion"
            } else {
                "its events"
            },
            acked.position
        ))?;
        Ok(Acked {
            events: shown,
            position: Some(acked.position),
        })
    }
}
