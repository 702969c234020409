//! Writes: admission (names, namespaces), create, update and patch in every flavour.

use super::managed::*;
use super::*;

impl Store {
    pub(super) fn check_namespace(&self, rt: &ResourceType, ns: &str) -> Result<()> {
        if !rt.namespaced {
            return Ok(());
        }
        let nst = self.namespaces();
        if self.get(&nst, "", ns).is_err() {
            return Err(ApiError::not_found(&nst, ns));
        }
        Ok(())
    }

    /// Prunes and validates a custom resource about to be stored (`old`: the stored object,
    /// on updates), returning its field errors; unknown fields under
    /// `fieldValidation=Strict` are a 400, as on a real server.
    pub(super) fn admit(
        &self,
        rt: &ResourceType,
        object: &mut Value,
        old: Option<&Value>,
        ctx: &WriteCtx,
    ) -> Result<Vec<FieldError>> {
        let Some(schema) = rt.schema.as_ref().filter(|_| rt.custom) else {
            return Ok(Vec::new());
        };
        let unknown = schema::prune_object(object, schema);
        if ctx.strict && !unknown.is_empty() {
            let msgs: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{}\" cannot be handled as a {kind}: strict decoding error: {}",
                rt.version,
                msgs.join(", "),
                kind = rt.kind,
            )));
        }
        Ok(schema::validate(object, old, schema))
    }

    /// The naming rule of a kind's objects.
    pub(super) fn name_rule(rt: &ResourceType) -> NameRule {
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "namespaces") => NameRule::Label,
            ("", "services") => NameRule::Dns1035,
            _ => NameRule::Subdomain,
        }
    }

    /// The `metadata.name`/`generateName` errors of an object about to be created.
    pub(super) fn name_errors(rt: &ResourceType, body: &Value, name: &str) -> Vec<FieldError> {
        let mut errs = Vec::new();
        if Self::is_crd(rt) {
            let want = format!(
                "{}.{}",
                body["spec"]["names"]["plural"].as_str().unwrap_or_default(),
                body["spec"]["group"].as_str().unwrap_or_default()
            );
            if name != want {
                errs.push(FieldError::invalid(
                    "metadata.name",
                    json!(name),
                    "must be spec.names.plural+\".\"+spec.group",
                ));
            }
            return errs;
        }
        let rule = Self::name_rule(rt);
        if let Some(prefix) = body["metadata"]["generateName"].as_str() {
            for msg in field::name_problems(rule, prefix, true) {
                errs.push(FieldError::invalid(
                    "metadata.generateName",
                    json!(prefix),
                    msg,
                ));
            }
        }
        for msg in field::name_problems(rule, name, false) {
            errs.push(FieldError::invalid("metadata.name", json!(name), msg));
        }
        errs
    }

    /// A Secret's `stringData` is merged into `data` (base64) and never stored, and its
    /// type defaults to `Opaque`, as on a real server.
    pub(super) fn normalize_secret(rt: &ResourceType, object: &mut Value) {
        use base64::Engine;
        if !(rt.group.is_empty() && rt.plural == "secrets") {
            return;
        }
        if object["type"].as_str().is_none_or(str::is_empty) {
            object["type"] = json!("Opaque");
        }
        let Some(string_data) = object.as_object_mut().and_then(|m| m.remove("stringData")) else {
            return;
        };
        if !object["data"].is_object() {
            object["data"] = json!({});
        }
        if let Some(map) = string_data.as_object() {
            for (k, v) in map {
                let plain = v.as_str().unwrap_or_default();
                object["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(plain));
            }
        }
    }

    pub(super) fn is_crd(rt: &ResourceType) -> bool {
        rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions"
    }

    /// A CRD is accepted and established as soon as it is stored.
    pub(super) fn establish(crd: &mut Value) {
        let t = now();
        let cond = |type_: &str, reason: &str, msg: &str| json!({"type": type_, "status": "True", "reason": reason, "message": msg, "lastTransitionTime": t});
        let versions: Vec<Value> = crd["spec"]["versions"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .filter(|v| v["storage"].as_bool() == Some(true))
                    .map(|v| v["name"].clone())
                    .collect()
            })
            .unwrap_or_default();
        crd["status"] = json!({
            "acceptedNames": crd["spec"]["names"],
            "conditions": [
                cond("NamesAccepted", "NoConflicts", "no conflicts found"),
                cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            ],
            "storedVersions": versions,
        });
    }

    pub(super) fn managed_entry(
        rt: &ResourceType,
        ctx: &WriteCtx,
        operation: &str,
        sub: Sub,
        fields: Value,
    ) -> Value {
        let mut e = json!({
            "manager": ctx.manager,
            "operation": operation,
            "apiVersion": rt.api_version(),
            "time": now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        });
        if let Some(s) = sub.name() {
            e["subresource"] = json!(s);
        }
        e
    }

    pub(super) fn record_manager(object: &mut Value, entry: Value) {
        let same = |e: &Value| {
            e["manager"] == entry["manager"]
                && e["operation"] == entry["operation"]
                && e["subresource"] == entry["subresource"]
        };
        let mut list: Vec<Value> = object["metadata"]["managedFields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        list.retain(|e| !same(e));
        list.push(entry);
        object["metadata"]["managedFields"] = Value::Array(list);
    }

    /// `create`.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        mut body: Value,
        ctx: &WriteCtx,
    ) -> Result<Value> {
        self.create_with(rt, ns, &mut body, ctx, "Update")?;
        Ok(body)
    }

    pub(super) fn create_with(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        body: &mut Value,
        ctx: &WriteCtx,
        operation: &str,
    ) -> Result<()> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be an object",
            ));
        }
        if !body["metadata"].is_object() {
            body["metadata"] = json!({});
        }
        let fields = fields_of(body, true, rt.schema.as_ref());
        let mut name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            let Some(prefix) = body["metadata"]["generateName"].as_str() else {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    &["metadata.name: Required value: name or generateName is required".into()],
                ));
            };
            let suffix: String = (0..5)
                .map(|_| {
                    let chars = b"bcdfghjklmnpqrstvwxz2456789";
                    chars[rand::random_range(0..chars.len())] as char
                })
                .collect();
            name = format!("{prefix}{suffix}");
        }
        if rt.namespaced {
            match body["metadata"]["namespace"].as_str() {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
        }
        self.check_namespace(rt, ns)?;
        if self.get(rt, ns, &name).is_ok() {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", rt.qualified()),
            )
            .with_details(rt, &name));
        }
        // The status of a resource with a status subresource cannot be set on create.
        if rt.status_subresource
            && let Some(map) = body.as_object_mut()
        {
            map.remove("status");
        }
        let mut errors = Self::name_errors(rt, body, &name);
        errors.extend(self.admit(rt, body, None, ctx)?);
        if !errors.is_empty() {
            return Err(ApiError::invalid_fields(rt, &name, &errors));
        }
        Self::normalize_secret(rt, body);
        *body = Self::with_type_meta(rt, body.take());
        let meta = &mut body["metadata"];
        meta["name"] = json!(name);
        if rt.namespaced {
            meta["namespace"] = json!(ns);
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        meta["uid"] = json!(uuid::Uuid::now_v7().to_string());
        meta["creationTimestamp"] = json!(now());
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
            m.remove("managedFields");
            if rt.generation {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        Self::record_manager(
            body,
            Self::managed_entry(rt, ctx, operation, Sub::Main, fields),
        );
        if Self::is_crd(rt) {
            Self::establish(body);
        }
        if rt.group.is_empty() && rt.plural == "namespaces" {
            body["status"] = json!({"phase": "Active"});
            body["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        if ctx.dry_run {
            return Ok(());
        }
        *body = self.commit(rt, ns, &name, body.take(), "ADDED");
        if Self::is_crd(rt) {
            self.registry.register_crd(body);
        }
        Ok(())
    }

    /// `update` (PUT) of the object or of a subresource.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        sub: Sub,
        ctx: &WriteCtx,
    ) -> Result<Value> {
        let old = self.get(rt, ns, name)?;
        let (body, fields) = if sub == Sub::Scale {
            let fields = fields_of(&body, false, None);
            (self.object_with_scale(rt, &old, &body)?, fields)
        } else {
            let fields = fields_of(&body, true, rt.schema.as_ref());
            (body, fields)
        };
        match body["metadata"]["resourceVersion"].as_str() {
            None | Some("") if rt.custom => {
                return Err(ApiError::invalid(rt, name, &[
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update".into(),
                ]));
            }
            None | Some("") => {}
            Some(rv)
                if rv
                    != old["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default() =>
            {
                return Err(ApiError::conflict(rt, name));
            }
            Some(_) => {}
        }
        let entry = Self::managed_entry(rt, ctx, "Update", sub, fields);
        let out = self.finish_write(rt, ns, name, old, body, sub, ctx, entry)?;
        self.scale_response(rt, out, sub)
    }

    /// `patch` of the object or of a subresource; an apply patch creates a missing object.
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        patch: Patch,
        sub: Sub,
        ctx: &WriteCtx,
    ) -> Result<Value> {
        let old = match self.get(rt, ns, name) {
            Ok(old) => old,
            Err(e) => {
                if let (Patch::Apply(body), Sub::Main) = (&patch, sub) {
                    let mut body = body.clone();
                    if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
                        return Err(ApiError::bad_request(
                            "the name of the object does not match the name on the URL",
                        ));
                    }
                    body["metadata"]["name"] = json!(name);
                    self.create_with(rt, ns, &mut body, ctx, "Apply")?;
                    return Ok(body);
                }
                return Err(e);
            }
        };
        // Patches to /scale apply to the Scale view of the object.
        let base = if sub == Sub::Scale {
            self.scale_of(rt, &old)?
        } else {
            old.clone()
        };
        let mut patched = base.clone();
        // The Scale view has no schema of its own.
        let schema = rt.schema.as_ref().filter(|_| sub != Sub::Scale);
        let (operation, fields) = match &patch {
            Patch::Json(ops) => {
                // As on the real API server (evanphx/json-patch), `test` of a missing path
                // against `null` succeeds: kube-rs adds the first finalizer that way.
                let ops = match ops.as_array() {
                    Some(list) => Value::Array(
                        list.iter()
                            .filter(|op| {
                                !(op["op"] == "test"
                                    && op["value"].is_null()
                                    && patched.pointer(op["path"].as_str().unwrap_or("")).is_none())
                            })
                            .cloned()
                            .collect(),
                    ),
                    None => ops.clone(),
                };
                let ops: json_patch::Patch = serde_json::from_value(ops)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                apply_json_patch(&mut patched, &ops).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the JSON patch cannot be applied: {e}"),
                    )
                })?;
                ("Update", fields_of(&patched, sub != Sub::Scale, schema))
            }
            Patch::Merge(body) => {
                let mut body = body.clone();
                strip_directives(&mut body);
                json_patch::merge(&mut patched, &body);
                ("Update", fields_of(&body, sub != Sub::Scale, schema))
            }
            Patch::Apply(body) => {
                apply_merge(&mut patched, body, schema);
                let fields = fields_of(body, sub != Sub::Scale, schema);
                // Fields this manager applied before and no longer applies are removed,
                // unless another manager also owns them.
                let managers: Vec<Value> = old["metadata"]["managedFields"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let subname = sub.name().map(Value::from).unwrap_or(Value::Null);
                let mine = |e: &Value| {
                    e["manager"] == json!(ctx.manager)
                        && e["operation"] == "Apply"
                        && e["subresource"] == subname
                };
                if let Some(prev) = managers.iter().find(|e| mine(e)) {
                    let mut leaves = Vec::new();
                    leaf_paths(&prev["fieldsV1"], &mut Vec::new(), &mut leaves);
                    for path in leaves {
                        // A list item stays while another manager owns anything in it.
                        let owned = match path.split_last() {
                            Some((last, item)) if last == "." => item,
                            _ => path.as_slice(),
                        };
                        let owned_elsewhere = managers
                            .iter()
                            .filter(|e| !mine(e))
                            .any(|e| has_path(&e["fieldsV1"], owned));
                        if !has_path(&fields, &path) && !owned_elsewhere {
                            remove_path(&mut patched, &path);
                        }
                    }
                }
                if !ctx.force {
                    let conflicts =
                        apply_conflicts(&managers, &ctx.manager, &fields, &base, &patched);
                    if !conflicts.is_empty() {
                        return Err(ApiError::new(
                            409,
                            "Conflict",
                            format!(
                                "Apply failed with {} conflict{}: {}",
                                conflicts.len(),
                                if conflicts.len() == 1 { "" } else { "s" },
                                conflicts.join("\n")
                            ),
                        )
                        .with_details(rt, name));
                    }
                }
                ("Apply", fields)
            }
        };
        // A resourceVersion in the patch is a precondition.
        if let Some(rv) = patched["metadata"]["resourceVersion"].as_str()
            && rv
                != base["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
        {
            return Err(ApiError::conflict(rt, name));
        }
        let new = if sub == Sub::Scale {
            self.object_with_scale(rt, &old, &patched)?
        } else {
            patched
        };
        let entry = Self::managed_entry(rt, ctx, operation, sub, fields);
        let out = self.finish_write(rt, ns, name, old, new, sub, ctx, entry)?;
        self.scale_response(rt, out, sub)
    }
}
