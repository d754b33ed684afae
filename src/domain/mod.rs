//! Domains: the validated definition, its on-disk store, and the table that
//! maps names and UUIDs to the instance the world sees (plus the shadow table
//! for instances being migrated in).

pub mod definition;
pub mod mcs;
pub mod store;
pub mod table;

pub use definition::{Definition, DefinitionError};
pub use store::{Store, StoreError};
pub use table::{DomainTable, TableError};
