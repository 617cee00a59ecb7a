//! The plan being built: the kernel configuration the steps fill in, the field slots they
//! share, and the field errors they find (all reported together, not only the first).

use fathom_common::{ProbeConfig, Source, StashConfig, filter};
use fathom_crds::verdict::ProbeVerdict;

use super::{
    not_feasible,
    resolve::{Resolver, infeasible},
    template::Template,
};
use crate::engine::error::EngineError;

pub(super) struct Draft<'a> {
    /// The main attach point, where keys, values and event fields are read.
    pub(super) main: Resolver<'a>,
    pub(super) config: ProbeConfig,
    pub(super) stash: StashConfig,
    /// What the kernel key's field slots read, in the order keys and event fields took them.
    pub(super) field_slots: Vec<Source>,
    /// The field errors found so far.
    pub(super) errors: Vec<ProbeVerdict>,
}

impl<'a> Draft<'a> {
    pub(super) fn new(main: Resolver<'a>) -> Draft<'a> {
        Draft {
            main,
            config: ProbeConfig::EMPTY,
            stash: StashConfig::EMPTY,
            field_slots: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Records a field error at the main attach point.
    pub(super) fn main_error(&mut self, message: String) {
        self.errors
            .push(infeasible(&self.main.point.label(), message));
    }

    /// The kernel key's field slots: at most 2, shared by keys and event fields.
    pub(super) fn key_fields(&mut self) {
        if self.field_slots.len() > 2 {
            self.main_error(
                "more than 2 field keys and event fields together; aggregate by fewer fields"
                    .into(),
            );
        }
        for (i, src) in self.field_slots.iter().take(2).enumerate() {
            self.config.key_fields[i] = *src;
        }
    }

    /// The template's equality filter on a field, if it has one.
    pub(super) fn field_match(&mut self, template: &Template) {
        if let Some((n, v)) = &template.matches {
            match self.main.named(n) {
                Ok((src, _)) => {
                    self.config.match_src = src;
                    self.config.match_value = *v;
                    self.config.filter_flags |= filter::FIELD;
                }
                Err(e) => self.main_error(e),
            }
        }
    }

    /// The configurations, or the verdict of every field error found.
    pub(super) fn finish(self) -> Result<(ProbeConfig, StashConfig), EngineError> {
        if !self.errors.is_empty() {
            return Err(not_feasible(self.errors));
        }
        Ok((self.config, self.stash))
    }
}
