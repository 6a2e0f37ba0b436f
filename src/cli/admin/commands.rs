//! One method per `tokenvault admin` subcommand: each makes its RPCs and
//! writes the result through [`crate::cli::output`].

use super::*;

impl Admin {
    /// Prints `json` or, for tables, what `table` writes.
    pub(super) fn print(
        &self,
        json: impl FnOnce() -> Value,
        table: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), CliError> {
        output::print(self.output, json, table)
    }

    pub(super) fn print_receipt(&self, r: &pb::DeletionReceipt) -> Result<(), CliError> {
        self.print(
            || output::receipt_json(r),
            |out| output::receipt_fields(r).write(out),
        )
    }

    pub(super) fn print_key_version(&self, v: &pb::KeyVersionInfo) -> Result<(), CliError> {
        self.print(
            || output::key_version_json(v),
            |out| writeln!(out, "{}", output::key_version_text(v)),
        )
    }

    pub(super) async fn connections(
        &mut self,
        command: ConnectionsCommand,
    ) -> Result<(), CliError> {
        match command {
            ConnectionsCommand::List(args) => {
                let client = self.client.clone();
                let (found, more) = collect(args.limit, |page_size, page_token| {
                    let mut client = client.clone();
                    let request = pb::AdminServiceListConnectionsRequest {
                        tenant_id: args.tenant.clone(),
                        account_id: args.account.clone(),
                        integration: args.integration.map(|i| i.proto() as i32),
                        status: args.status.map(|s| s.proto() as i32),
                        google_subject: args.google_subject.clone(),
                        include_deleted: args.include_deleted,
                        page_size,
                        page_token,
                    };
                    async move {
                        let r = answer("ListConnections", client.list_connections(request).await)?;
                        Ok((r.connections, r.next_page_token))
                    }
                })
                .await?;
                self.print(
                    || {
                        json!({
                            "connections": found.iter().map(output::connection_detail_json).collect::<Vec<_>>(),
                            "more": more,
                        })
                    },
                    |out| {
                        let mut t = output::connection_table();
                        for d in &found {
                            t.row(output::connection_row(d));
                        }
                        t.write(out)?;
                        more_note(out, more, found.len())
                    },
                )
            }
            ConnectionsCommand::Show { id } => {
                let d = answer(
                    "GetConnection",
                    self.client
                        .get_connection(pb::AdminServiceGetConnectionRequest { connection_id: id })
                        .await,
                )?
                .connection
                .ok_or_else(|| CliError::missing_field("GetConnection", "connection"))?;
                self.print(
                    || output::connection_detail_json(&d),
                    |out| output::connection_fields(&d).write(out),
                )
            }
            ConnectionsCommand::Revoke { id, reason } => {
                let r = answer(
                    "RevokeConnection",
                    self.client
                        .revoke_connection(pb::RevokeConnectionRequest {
                            connection_id: id,
                            reason,
                        })
                        .await,
                )?
                .receipt
                .ok_or_else(|| CliError::missing_field("RevokeConnection", "receipt"))?;
                self.print_receipt(&r)
            }
        }
    }

    pub(super) async fn accounts(&mut self, command: AccountsCommand) -> Result<(), CliError> {
        match command {
            AccountsCommand::Delete {
                tenant,
                account,
                reason,
                yes: _,
            } => {
                let r = answer(
                    "DeleteAccount",
                    self.client
                        .delete_account(pb::AdminServiceDeleteAccountRequest {
                            tenant_id: tenant,
                            account_id: account,
                            reason,
                        })
                        .await,
                )?
                .receipt
                .ok_or_else(|| CliError::missing_field("DeleteAccount", "receipt"))?;
                self.print_receipt(&r)
            }
        }
    }

    pub(super) async fn receipts(&mut self, command: ReceiptsCommand) -> Result<(), CliError> {
        match command {
            ReceiptsCommand::Show { id } => {
                let r = answer(
                    "GetDeletionReceipt",
                    self.client
                        .get_deletion_receipt(pb::AdminServiceGetDeletionReceiptRequest {
                            receipt_id: id,
                        })
                        .await,
                )?
                .receipt
                .ok_or_else(|| CliError::missing_field("GetDeletionReceipt", "receipt"))?;
                self.print_receipt(&r)
            }
            ReceiptsCommand::List {
                incomplete,
                overdue,
                tenant,
                account,
                limit,
            } => {
                let client = self.client.clone();
                let (found, more) = collect(limit, |page_size, page_token| {
                    let mut client = client.clone();
                    let request = pb::ListDeletionReceiptsRequest {
                        incomplete_only: incomplete,
                        overdue_only: overdue,
                        tenant_id: tenant.clone(),
                        account_id: account.clone(),
                        page_size,
                        page_token,
                    };
                    async move {
                        let r = answer(
                            "ListDeletionReceipts",
                            client.list_deletion_receipts(request).await,
                        )?;
                        Ok((r.receipts, r.next_page_token))
                    }
                })
                .await?;
                self.print(
                    || {
                        json!({
                            "receipts": found.iter().map(output::receipt_json).collect::<Vec<_>>(),
                            "more": more,
                        })
                    },
                    |out| {
                        let mut t = output::receipt_table();
                        for r in &found {
                            t.row(output::receipt_row(r));
                        }
                        t.write(out)?;
                        more_note(out, more, found.len())
                    },
                )
            }
        }
    }

    pub(super) async fn key_status(&mut self) -> Result<pb::KeyStatusResponse, CliError> {
        answer(
            "KeyStatus",
            self.client.key_status(pb::KeyStatusRequest {}).await,
        )
    }

    pub(super) async fn keys(&mut self, command: AdminKeysCommand) -> Result<(), CliError> {
        match command {
            AdminKeysCommand::Status => {
                let s = self.key_status().await?;
                self.print(
                    || output::key_status_json(&s),
                    |out| {
                        let mut f = Fields::new();
                        f.add("provider", s.provider.clone())
                            .add("primary_version", format!("v{}", s.primary_version))
                            .add(
                                "oldest_version_in_use",
                                format!(
                                    "v{} (age {})",
                                    s.oldest_version_in_use,
                                    age_text(s.oldest_in_use_age_seconds)
                                ),
                            )
                            .add("max_kek_age_days", s.max_kek_age_days.to_string())
                            .add("rotation_overdue", yes_no(s.rotation_overdue))
                            .add(
                                "rotation",
                                s.rotation
                                    .as_ref()
                                    .map_or_else(|| "-".to_owned(), output::rotation_text),
                            );
                        f.write(out)?;
                        writeln!(out)?;
                        output::key_versions_table(&s.versions).write(out)?;
                        writeln!(out)?;
                        output::replicas_table(&s.replicas).write(out)
                    },
                )
            }
            AdminKeysCommand::Rotate { wait } => {
                let mut run = answer(
                    "RotateKeys",
                    self.client.rotate_keys(pb::RotateKeysRequest {}).await,
                )?
                .rotation
                .ok_or_else(|| CliError::missing_field("RotateKeys", "rotation"))?;
                if wait {
                    run = self.wait_for_rotation(run).await?;
                }
                self.print(
                    || output::rotation_json(&run),
                    |out| writeln!(out, "{}", output::rotation_text(&run)),
                )?;
                if run.state == pb::RotationState::Failed as i32 {
                    return Err(CliError::failed(format!(
                        "rotation {} failed: {}",
                        run.run_id, run.last_error
                    )));
                }
                Ok(())
            }
            AdminKeysCommand::Retire { version } => {
                let v = answer(
                    "RetireKey",
                    self.client
                        .retire_key(pb::RetireKeyRequest { version })
                        .await,
                )?
                .version
                .ok_or_else(|| CliError::missing_field("RetireKey", "version"))?;
                self.print_key_version(&v)
            }
            AdminKeysCommand::Destroy { version, yes: _ } => {
                let v = answer(
                    "DestroyKey",
                    self.client
                        .destroy_key(pb::DestroyKeyRequest { version })
                        .await,
                )?
                .version
                .ok_or_else(|| CliError::missing_field("DestroyKey", "version"))?;
                self.print_key_version(&v)
            }
            AdminKeysCommand::Report => {
                let r = answer(
                    "KeyReport",
                    self.client.key_report(pb::KeyReportRequest {}).await,
                )?;
                self.print(
                    || output::key_report_json(&r),
                    |out| {
                        let mut f = Fields::new();
                        f.add("generated_at", output::ts_text(r.generated_at.as_ref()))
                            .add("provider", r.provider.clone())
                            .add("primary_version", format!("v{}", r.primary_version))
                            .add(
                                "oldest_version_in_use",
                                format!(
                                    "v{} (age {})",
                                    r.oldest_version_in_use,
                                    age_text(r.oldest_in_use_age_seconds)
                                ),
                            )
                            .add("max_kek_age_days", r.max_kek_age_days.to_string())
                            .add("policy_met", yes_no(r.policy_met))
                            .add("policy_detail", r.policy_detail.clone());
                        f.write(out)?;
                        writeln!(out)?;
                        output::key_versions_table(&r.versions).write(out)?;
                        writeln!(out)?;
                        writeln!(out, "lifecycle:")?;
                        for v in &r.versions {
                            for line in output::key_lifecycle_lines(v) {
                                writeln!(out, "  {line}")?;
                            }
                        }
                        writeln!(out)?;
                        if r.rotations.is_empty() {
                            writeln!(out, "no rotations")?;
                        } else {
                            writeln!(out, "rotations:")?;
                            for run in &r.rotations {
                                writeln!(out, "  {}", output::rotation_text(run))?;
                            }
                        }
                        writeln!(out)?;
                        output::replicas_table(&r.replicas).write(out)
                    },
                )
            }
        }
    }

    /// Polls KeyStatus until `run` has completed or failed, showing its
    /// progress on stderr (a bar on a terminal, plain lines elsewhere) and
    /// ending with one line saying how it ended.
    pub(super) async fn wait_for_rotation(
        &mut self,
        mut run: pb::RotationProgress,
    ) -> Result<pb::RotationProgress, CliError> {
        let mut progress = Progress::start(
            format!("rotating to v{}", run.target_version),
            "wrapped keys",
            run.done,
            run.total,
        );
        let running = pb::RotationState::Running as i32;
        while run.state == running {
            tokio::time::sleep(ROTATION_POLL).await;
            // An early return drops `progress`, which clears its bar.
            let status = self.key_status().await?;
            match status.rotation {
                Some(latest) if latest.run_id == run.run_id => {
                    run = latest;
                    progress.update(run.done, run.total);
                }
                Some(latest) => {
                    return Err(CliError::failed(format!(
                        "rotation {} was superseded by rotation {}",
                        run.run_id, latest.run_id
                    )));
                }
                None => {
                    return Err(CliError::failed(format!(
                        "rotation {} is no longer reported by the vault",
                        run.run_id
                    )));
                }
            }
        }
        progress.finish(
            &format!(
                "rotation to v{} {}",
                run.target_version,
                output::rotation_state_text(run.state)
            ),
            run.done,
            run.total,
        );
        Ok(run)
    }

    pub(super) async fn query_audit(
        &mut self,
        request: pb::QueryAuditRequest,
    ) -> Result<pb::QueryAuditResponse, CliError> {
        answer("QueryAudit", self.client.query_audit(request).await)
    }

    pub(super) async fn audit(&mut self, command: AuditCommand) -> Result<(), CliError> {
        match command {
            AuditCommand::Tail { lines, follow } => self.audit_tail(lines, follow).await,
            AuditCommand::Query(args) => {
                let client = self.client.clone();
                let last_seq = std::cell::Cell::new(0);
                let (found, more) = collect(args.limit, |page_size, page_token| {
                    let mut client = client.clone();
                    let request = pb::QueryAuditRequest {
                        actor: args.actor.clone(),
                        action: args.action.clone(),
                        target: args.target.clone(),
                        outcome: args.outcome.map(|o| o.proto() as i32),
                        since: args.since,
                        until: args.until,
                        after_seq: None,
                        newest_first: args.newest_first,
                        page_size,
                        page_token,
                    };
                    let last_seq = &last_seq;
                    async move {
                        let r = answer("QueryAudit", client.query_audit(request).await)?;
                        if last_seq.get() == 0 {
                            last_seq.set(r.last_seq);
                        }
                        Ok((r.entries, r.next_page_token))
                    }
                })
                .await?;
                self.print(
                    || {
                        json!({
                            "entries": found.iter().map(output::audit_entry_json).collect::<Vec<_>>(),
                            "last_seq": last_seq.get(),
                            "more": more,
                        })
                    },
                    |out| {
                        let mut t = output::audit_table();
                        for e in &found {
                            t.row(output::audit_row(e));
                        }
                        t.write(out)?;
                        more_note(out, more, found.len())
                    },
                )
            }
            AuditCommand::Verify { from, to } => {
                let v = answer(
                    "VerifyAudit",
                    self.client
                        .verify_audit(pb::VerifyAuditRequest {
                            from_seq: from,
                            to_seq: to,
                        })
                        .await,
                )?;
                let broken = v
                    .first_broken_seq
                    .map_or_else(|| "unknown".to_owned(), |s| s.to_string());
                self.print(
                    || output::verify_json(&v),
                    |out| {
                        writeln!(
                            out,
                            "entries checked: {} (range {}..={}), checkpoints verified: {}",
                            v.entries_checked, v.from_seq, v.to_seq, v.checkpoints_verified
                        )?;
                        if !v.witness_files.is_empty() {
                            writeln!(
                                out,
                                "checkpoints witnessed: {} (witness: {})",
                                v.checkpoints_witnessed,
                                v.witness_files.join(", ")
                            )?;
                        }
                        if v.ok {
                            writeln!(out, "ok: {}", v.detail)
                        } else {
                            writeln!(out, "first broken entry: {broken}: {}", v.detail)
                        }
                    },
                )?;
                if v.ok {
                    Ok(())
                } else {
                    Err(CliError::failed(format!(
                        "the audit log does not verify: first broken entry: {broken}: {}",
                        v.detail
                    )))
                }
            }
            AuditCommand::Export { out } => self.audit_export(out).await,
        }
    }

    /// `audit tail`: the newest `lines` entries, oldest first; with
    /// `follow`, see [`Admin::audit_follow`].
    pub(super) async fn audit_tail(&mut self, lines: usize, follow: bool) -> Result<(), CliError> {
        if follow {
            return self.audit_follow(lines).await;
        }
        let mut newest = Vec::new();
        let mut token = String::new();
        let mut last_seq = 0;
        while newest.len() < lines {
            let r = self
                .query_audit(pb::QueryAuditRequest {
                    newest_first: true,
                    page_size: page_size(lines, newest.len()),
                    page_token: token,
                    ..Default::default()
                })
                .await?;
            last_seq = last_seq.max(r.last_seq);
            newest.extend(r.entries);
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        if lines == 0 {
            last_seq = self.query_audit(head_request()).await?.last_seq;
        }
        newest.truncate(lines);
        newest.reverse();
        self.print(
            || {
                json!({
                    "entries": newest.iter().map(output::audit_entry_json).collect::<Vec<_>>(),
                    "last_seq": last_seq,
                })
            },
            |out| {
                let mut table = output::audit_table();
                for e in &newest {
                    table.row(output::audit_row(e));
                }
                table.write(out)
            },
        )
    }

    /// `audit tail --follow`: one `FollowAudit` stream, which the vault
    /// audits once, when it opens (its own entry is the newest of the
    /// backlog), however long it runs. The newest `lines` entries are printed
    /// first (a table, or one JSON line each), then every new entry as it is
    /// appended, until interrupted or the stream fails.
    pub(super) async fn audit_follow(&mut self, lines: usize) -> Result<(), CliError> {
        let rpc = "FollowAudit";
        let mut stream = answer(
            rpc,
            self.client
                .follow_audit(pb::FollowAuditRequest {
                    after_seq: None,
                    backlog: u32::try_from(lines).unwrap_or(u32::MAX),
                    after_seqs: Vec::new(),
                })
                .await,
        )?;
        let json = self.output == OutputFormat::Json;
        let mut out = io::stdout();
        // The backlog is printed as one table once it is complete; later rows
        // are padded to the widths printed so far.
        let mut backlog = output::audit_table();
        let mut widths: Option<Vec<usize>> = None;
        loop {
            let batch = match stream.message().await {
                Ok(Some(batch)) => batch,
                Ok(None) => {
                    return Err(CliError::new(
                        Exit::Unreachable,
                        format!("{rpc}: the vault ended the stream"),
                    ));
                }
                Err(status) => return Err(CliError::status(rpc, &status)),
            };
            if json {
                for e in &batch.entries {
                    output::write_json_line(&mut out, &output::audit_entry_json(e))
                        .map_err(write_failed)?;
                }
            } else if let Some(widths) = widths.as_mut() {
                let mut rows = output::audit_table();
                for e in &batch.entries {
                    rows.row(output::audit_row(e));
                }
                *widths = widths
                    .iter()
                    .zip(rows.widths())
                    .map(|(a, b)| (*a).max(b))
                    .collect();
                rows.write_rows(&mut out, widths).map_err(write_failed)?;
            } else {
                for e in &batch.entries {
                    backlog.row(output::audit_row(e));
                }
                if batch.caught_up {
                    backlog.write(&mut out).map_err(write_failed)?;
                    widths = Some(backlog.widths());
                }
            }
            out.flush().map_err(write_failed)?;
        }
    }

    /// `audit export`: entries 1 to the newest at the start, as JSON Lines.
    pub(super) async fn audit_export(&mut self, path: Option<PathBuf>) -> Result<(), CliError> {
        let mut sink: Box<dyn Write> = match &path {
            // Owner-only (0600), like every file the vault writes: the log
            // names identities, connections and token fingerprints.
            Some(p) => Box::new(io::BufWriter::new(
                crate::files::private_options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
                    .map_err(|e| CliError::failed(format!("cannot create {}: {e}", p.display())))?,
            )),
            None => Box::new(io::BufWriter::new(io::stdout())),
        };
        let progress = show_progress();
        let mut token = String::new();
        let mut end: Option<u64> = None;
        let mut written = 0u64;
        'pages: loop {
            let r = self
                .query_audit(pb::QueryAuditRequest {
                    page_size: page_size(0, 0),
                    page_token: token,
                    ..Default::default()
                })
                .await?;
            let last = *end.get_or_insert(r.last_seq);
            for e in &r.entries {
                if e.seq > last {
                    break 'pages;
                }
                output::write_json_line(&mut sink, &output::audit_entry_json(e))
                    .map_err(write_failed)?;
                written += 1;
            }
            if progress {
                let _ = write!(io::stderr(), "\rexported {written}/{last} entries");
            }
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        if progress {
            let _ = writeln!(io::stderr());
        }
        sink.flush().map_err(write_failed)?;
        drop(sink);
        let last_seq = end.unwrap_or(0);
        if let Some(p) = path {
            self.print(
                || json!({ "out": p.display().to_string(), "entries": written, "last_seq": last_seq }),
                |out| {
                    writeln!(
                        out,
                        "exported {} (up to seq {last_seq}) to {}",
                        output::plural(written, "entry", "entries"),
                        p.display()
                    )
                },
            )?;
        }
        Ok(())
    }
}
